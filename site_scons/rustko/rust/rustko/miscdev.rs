//! Misc character devices (`/dev/NAME`): Rust implements `FileOps`, the C runtime owns the
//! `struct miscdevice` and `file_operations`.
use alloc_crate::boxed::Box;
use core::ffi::{c_long, c_void};

use crate::error::{code, Error, Result};
use crate::ffi;
use crate::heap::try_box;

/// Bytes the user asked to read, in user memory; `write` copies into it.
pub struct UserWriter {
    ptr: *mut u8,
    len: usize,
    done: usize,
}

impl UserWriter {
    /// Room left in the user's buffer.
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Copies as much of `data` as fits; `EFAULT` when the user's memory is not writable.
    pub fn write(&mut self, data: &[u8]) -> Result<usize> {
        let n = data.len().min(self.remaining());
        // SAFETY: copy_to_user checks the user range itself.
        let left = unsafe { ffi::rustko_copy_to_user(self.ptr.add(self.done), data.as_ptr(), n as _) };
        if left != 0 {
            return Err(code::EFAULT);
        }
        self.done += n;
        Ok(n)
    }
}

/// Bytes the user wrote, in user memory; `read` copies them out.
pub struct UserReader {
    ptr: *const u8,
    len: usize,
    done: usize,
}

impl UserReader {
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Copies up to `out.len()` bytes; `EFAULT` when the user's memory is not readable.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        let n = out.len().min(self.remaining());
        // SAFETY: copy_from_user checks the user range itself.
        let left = unsafe { ffi::rustko_copy_from_user(out.as_mut_ptr(), self.ptr.add(self.done), n as _) };
        if left != 0 {
            return Err(code::EFAULT);
        }
        self.done += n;
        Ok(n)
    }
}

/// What a device does on read(2) and write(2). `offset` is the file position; return the
/// number of bytes handled (0 on read means end of file).
pub trait FileOps: Sync + Send {
    fn read(&self, _out: &mut UserWriter, _offset: u64) -> Result<usize> {
        Err(code::EINVAL)
    }

    fn write(&self, _input: &mut UserReader, _offset: u64) -> Result<usize> {
        Err(code::EINVAL)
    }
}

/// A registered `/dev/NAME`; deregistered when dropped.
pub struct MiscDevice<T: FileOps> {
    handle: *mut c_void,
    ops: Box<T>,
}

// SAFETY: the device only hands `&T` (T: Sync) to the file operations.
unsafe impl<T: FileOps> Sync for MiscDevice<T> {}
unsafe impl<T: FileOps> Send for MiscDevice<T> {}

fn finish(pos: *mut i64, result: Result<usize>) -> c_long {
    match result {
        Ok(n) => {
            // SAFETY: the runtime passes the file's position pointer.
            unsafe { *pos += n as i64 };
            n as c_long
        }
        Err(err) => err.to_errno() as c_long,
    }
}

unsafe extern "C" fn read_fn<T: FileOps>(ctx: *mut c_void, buf: *mut u8, len: usize, pos: *mut i64) -> c_long {
    // SAFETY: ctx is the Box<T> registered below, alive until deregistration.
    let ops = unsafe { &*(ctx as *const T) };
    let mut out = UserWriter { ptr: buf, len, done: 0 };
    let offset = unsafe { *pos } as u64;
    finish(pos, ops.read(&mut out, offset))
}

unsafe extern "C" fn write_fn<T: FileOps>(ctx: *mut c_void, buf: *mut u8, len: usize, pos: *mut i64) -> c_long {
    // SAFETY: as in read_fn.
    let ops = unsafe { &*(ctx as *const T) };
    let mut input = UserReader { ptr: buf, len, done: 0 };
    let offset = unsafe { *pos } as u64;
    finish(pos, ops.write(&mut input, offset))
}

impl<T: FileOps> MiscDevice<T> {
    /// Registers `/dev/<name>` (name: 1 to 31 bytes) served by `ops`.
    pub fn register(name: &str, ops: T) -> Result<Self> {
        let ops = try_box(ops)?;
        let ctx = &*ops as *const T as *mut c_void;
        let mut err = 0;
        // SAFETY: ctx stays valid (boxed) until Drop deregisters the device.
        let handle = unsafe {
            ffi::rustko_misc_register(name.as_ptr(), name.len() as _, ctx, Some(read_fn::<T>),
                                      Some(write_fn::<T>), &mut err)
        };
        if handle.is_null() {
            return Err(Error::from_errno(err));
        }
        Ok(MiscDevice { handle, ops })
    }

    pub fn ops(&self) -> &T {
        &self.ops
    }
}

impl<T: FileOps> Drop for MiscDevice<T> {
    fn drop(&mut self) {
        // SAFETY: registered in `register`; after this no file operation can reach `ops`.
        unsafe { ffi::rustko_misc_deregister(self.handle) };
    }
}
