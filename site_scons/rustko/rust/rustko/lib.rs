//! rustko's support crate: what the in-kernel Rust support gives a module, on kernels without it.
//!
//! Everything that depends on the kernel version lives in the C runtime that rustko compiles into
//! every module that calls it (`c/*.c`); this crate only calls its stable C ABI (`ffi`). A module that does
//! not `use rustko` links none of it and brings its own `#[panic_handler]`.
#![no_std]
#![feature(allocator_api)]

extern crate alloc as alloc_crate;

pub mod error;
mod ffi;
pub mod heap;
pub mod miscdev;
pub mod module;
mod panic;
pub mod param;
pub mod print;
pub mod sync;

pub use alloc_crate::{boxed::Box, format, string::String, vec, vec::Vec};
pub use error::{code, Error, Result};
pub use module::Module;

/// `use rustko::prelude::*;` brings the usual names into scope.
pub mod prelude {
    pub use crate::error::{code, Error, Result};
    pub use crate::heap::{try_box, TryPush};
    pub use crate::module::Module;
    pub use crate::{pr_alert, pr_crit, pr_debug, pr_emerg, pr_err, pr_info, pr_notice, pr_warn};
    pub use alloc_crate::{boxed::Box, format, string::String, vec, vec::Vec};
}
