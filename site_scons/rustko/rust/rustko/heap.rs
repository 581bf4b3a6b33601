//! `alloc` (Box, Vec, String) on the kernel allocator, with fallible constructors.
//!
//! Infallible allocation (`Box::new`, `vec![]`) panics when kmalloc fails, which BUG()s: in a
//! module, prefer `try_box`, `Vec::try_reserve`/`try_push` and return `ENOMEM`.
use core::alloc::{GlobalAlloc, Layout};

use alloc_crate::boxed::Box;
use alloc_crate::vec::Vec;

use crate::error::{code, Result};
use crate::ffi;

struct KernelAllocator;

// SAFETY: kmalloc/krealloc/kfree honour size and (through the runtime's rounding) alignment.
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { ffi::rustko_kmalloc(layout.size(), layout.align(), 0) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { ffi::rustko_kmalloc(layout.size(), layout.align(), 1) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { ffi::rustko_kfree(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { ffi::rustko_krealloc(ptr, new_size, layout.align()) }
    }
}

#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;

/// `Box::new` that reports `ENOMEM` instead of panicking.
pub fn try_box<T>(value: T) -> Result<Box<T>> {
    Box::try_new(value).map_err(|_| code::ENOMEM)
}

/// `Vec::push` that reports `ENOMEM` instead of panicking.
pub trait TryPush<T> {
    fn try_push(&mut self, value: T) -> Result;
}

impl<T> TryPush<T> for Vec<T> {
    fn try_push(&mut self, value: T) -> Result {
        self.try_reserve(1)?;
        self.push(value);
        Ok(())
    }
}
