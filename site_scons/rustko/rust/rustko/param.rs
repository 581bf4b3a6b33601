//! Module parameters, declared in Cargo.toml (`[package.metadata.kernel.params.NAME]`) and
//! read here by name; the storage and `module_param` live in the generated C shim.
use alloc_crate::string::String;
use core::ffi::{c_char, CStr};

use crate::error::{code, Error, Result};
use crate::ffi;

const BOOL: i32 = 4;
const CHARP: i32 = 5;

fn get(name: &str) -> Result<(i32, i64, *const c_char)> {
    let (mut kind, mut num, mut s) = (0, 0i64, core::ptr::null());
    // SAFETY: the runtime only reads `name[..len]` and writes the three out-pointers.
    let rc = unsafe { ffi::rustko_param(name.as_ptr(), name.len() as _, &mut kind, &mut num, &mut s) };
    if rc != 0 {
        return Err(Error::from_errno(rc));
    }
    Ok((kind, num, s))
}

/// An integer parameter (`int`, `uint`, `long`, `ulong`), widened to i64 (`ulong` above
/// i64::MAX reads as `ERANGE`).
pub fn int(name: &str) -> Result<i64> {
    match get(name)? {
        (BOOL | CHARP, _, _) => Err(code::EINVAL),
        (3, n, _) if n < 0 => Err(code::ERANGE),
        (_, n, _) => Ok(n),
    }
}

/// A `bool` parameter.
pub fn boolean(name: &str) -> Result<bool> {
    match get(name)? {
        (BOOL, n, _) => Ok(n != 0),
        _ => Err(code::EINVAL),
    }
}

/// A copy of a `charp` parameter (the kernel may replace the string when sysfs writes it).
pub fn string(name: &str) -> Result<String> {
    match get(name)? {
        (CHARP, _, ptr) if ptr.is_null() => Ok(String::new()),
        (CHARP, _, ptr) => {
            // SAFETY: a charp parameter points at a NUL-terminated string owned by the kernel.
            let text = unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| code::EINVAL)?;
            let mut out = String::new();
            out.try_reserve(text.len())?;
            out.push_str(text);
            Ok(out)
        }
        _ => Err(code::EINVAL),
    }
}
