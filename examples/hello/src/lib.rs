//! A kernel module in Rust that needs no kernel Rust support: it formats with `core::fmt`
//! and logs through the C shim that rustko generates.
#![no_std]

use core::fmt::{self, Write};

mod log;

use log::KernelLog;

/// Called by the shim's `module_init`: 0 on success or a negative errno.
#[no_mangle]
pub extern "C" fn rust_init() -> i32 {
    let mut primes = [13u32, 2, 7, 5, 11, 3];
    primes.sort_unstable();
    let sum: u32 = primes.iter().sum();
    let mut line = KernelLog::info();
    let _ = write!(line, "hello from Rust: sorted {:?}, sum {}", primes, sum);
    line.flush();
    0
}

/// Called by the shim's `module_exit`.
#[no_mangle]
pub extern "C" fn rust_exit() {
    let mut line = KernelLog::info();
    let _ = line.write_str("goodbye from Rust");
    line.flush();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = KernelLog::error();
    let _ = write!(line, "{}", info); // info.message() needs rustc >= 1.81
    line.flush();
    loop {
        core::hint::spin_loop();
    }
}

impl fmt::Debug for KernelLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelLog")
    }
}
