//! A sleeping lock (the kernel's `struct mutex`) guarding data shared by file operations.
use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ops::{Deref, DerefMut};

use crate::error::{code, Result};
use crate::ffi;

pub struct Mutex<T> {
    raw: *mut c_void,
    data: UnsafeCell<T>,
}

// SAFETY: the kernel mutex serialises every access to `data`.
unsafe impl<T: Send> Sync for Mutex<T> {}
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    /// Fails with `ENOMEM` when the lock cannot be allocated.
    pub fn new(data: T) -> Result<Self> {
        // SAFETY: plain allocation + mutex_init in the runtime.
        let raw = unsafe { ffi::rustko_mutex_new() };
        if raw.is_null() {
            return Err(code::ENOMEM);
        }
        Ok(Mutex { raw, data: UnsafeCell::new(data) })
    }

    /// Sleeps until the lock is free: never call it from atomic context.
    pub fn lock(&self) -> Guard<'_, T> {
        // SAFETY: `raw` is a live, initialised mutex until drop.
        unsafe { ffi::rustko_mutex_lock(self.raw) };
        Guard { mutex: self }
    }
}

impl<T> Drop for Mutex<T> {
    fn drop(&mut self) {
        // SAFETY: no guard can outlive `self`.
        unsafe { ffi::rustko_mutex_free(self.raw) };
    }
}

pub struct Guard<'a, T> {
    mutex: &'a Mutex<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the lock is held, and the guard is borrowed mutably.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { ffi::rustko_mutex_unlock(self.mutex.raw) };
    }
}
