//! A Rust module reading a global variable defined in C (src/answer.c): directly through an
//! `extern "C"` static, and through the C accessor `cglobal_answer_ptr()`. Both must see the
//! same storage, so a write through one is visible through the other. It logs (and panics)
//! through rustko's support crate.
#![no_std]

use rustko::pr_info;

extern "C" {
    /// `int cglobal_answer` in src/answer.c.
    static mut cglobal_answer: i32;
    /// Returns `&cglobal_answer`.
    fn cglobal_answer_ptr() -> *mut i32;
}

/// Called by the shim's `module_init`: 0, or -EINVAL when the two reads disagree.
#[no_mangle]
pub extern "C" fn rust_init() -> i32 {
    // SAFETY: module init runs once, before anything else of this module; nothing else writes
    // the global meanwhile, and the accessor returns its valid, aligned address.
    let (direct, via, after) = unsafe {
        let direct = cglobal_answer;
        let ptr = cglobal_answer_ptr();
        let via = *ptr;
        *ptr += 1;
        (direct, via, cglobal_answer)
    };
    pr_info!("C global read from Rust: direct {direct}, via accessor {via}, after +1 {after}");
    if direct == via && after == via + 1 { 0 } else { rustko::code::EINVAL.to_errno() }
}
