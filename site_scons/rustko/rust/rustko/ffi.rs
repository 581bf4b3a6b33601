//! The C runtime's ABI (`c/*.c` and the parameter table rustko generates per module).
use core::ffi::{c_char, c_int, c_long, c_longlong, c_ulong, c_void};

/// A misc device read/write callback: (ctx, user buffer, length, file position) -> bytes or -errno.
pub type IoFn = unsafe extern "C" fn(*mut c_void, *mut u8, usize, *mut i64) -> c_long;

extern "C" {
    pub fn rustko_printk(level: c_int, msg: *const u8, len: c_ulong);
    pub fn rustko_bug() -> !;
    pub fn rustko_kmalloc(size: usize, align: usize, zeroed: c_int) -> *mut u8;
    pub fn rustko_krealloc(ptr: *mut u8, new_size: usize, align: usize) -> *mut u8;
    pub fn rustko_kfree(ptr: *mut u8);
    pub fn rustko_copy_to_user(to: *mut u8, from: *const u8, n: c_ulong) -> c_ulong;
    pub fn rustko_copy_from_user(to: *mut u8, from: *const u8, n: c_ulong) -> c_ulong;
    pub fn rustko_misc_register(name: *const u8, name_len: c_ulong, ctx: *mut c_void, read: Option<IoFn>,
                                write: Option<IoFn>, err: *mut c_int) -> *mut c_void;
    pub fn rustko_misc_deregister(handle: *mut c_void);
    pub fn rustko_mutex_new() -> *mut c_void;
    pub fn rustko_mutex_lock(lock: *mut c_void);
    pub fn rustko_mutex_unlock(lock: *mut c_void);
    pub fn rustko_mutex_free(lock: *mut c_void);
    pub fn rustko_param(name: *const u8, len: c_ulong, kind: *mut c_int, num: *mut c_longlong,
                        s: *mut *const c_char) -> c_int;
}
