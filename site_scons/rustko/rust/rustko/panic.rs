//! A panic logs its message and location, then does what the in-kernel Rust support does: BUG().
use crate::{ffi, pr_emerg};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => pr_emerg!("panicked at {}:{}:{}: {}", loc.file(), loc.line(), loc.column(), info.message()),
        None => pr_emerg!("panicked: {}", info.message()),
    }
    // SAFETY: BUG() does not return.
    unsafe { ffi::rustko_bug() }
}
