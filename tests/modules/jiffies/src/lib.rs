//! Reads `jiffies`, a variable the kernel exports, straight from Rust. Position-independent code
//! reaches such an extern static through the GOT (`R_X86_64_GOTPCREL`, which module loaders
//! refuse); static code with UML's large code model uses a 64-bit absolute address.
#![no_std]

use rustko::prelude::*;

unsafe extern "C" {
    static jiffies: core::ffi::c_ulong;
}

struct Module;

impl rustko::Module for Module {
    fn init() -> Result<Self> {
        // SAFETY: an exported kernel variable; a volatile read is what READ_ONCE(jiffies) does.
        let now = unsafe { core::ptr::read_volatile(&raw const jiffies) };
        pr_info!("jiffies read from Rust: {}", now);
        Ok(Module)
    }
}

rustko::module!(Module);
