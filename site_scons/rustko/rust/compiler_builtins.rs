//! rustko's `compiler_builtins`: the kernel has no libgcc, and the real crate needs cargo.
//!
//! Like the kernel's `rust/compiler_builtins.rs`, it is a stub that the `#![no_std]` crates link
//! against. The integer helpers LLVM may call for 128-bit arithmetic are implemented here with
//! 64-bit operations only, so they are safe in kernel code.
#![feature(compiler_builtins)]
#![compiler_builtins]
#![no_builtins]
#![no_std]
#![allow(internal_features)]

/// Unsigned 128-bit division with remainder, by shift-and-subtract: no recursion into itself.
fn udivmod(n: u128, d: u128) -> (u128, u128) {
    if d == 0 {
        // Division by zero is checked by Rust before it gets here; keep a defined result.
        return (0, n);
    }
    if n < d {
        return (0, n);
    }
    let hi = (n >> 64) as u64;
    let dlo = d as u64;
    if (d >> 64) == 0 && hi == 0 {
        // checked_*: no panic path. rustc before ~1.85 keeps this crate out of LTO, where a
        // reference to core's panic stays undefined in the module (seen with rustc 1.78).
        let n64 = n as u64;
        return (n64.checked_div(dlo).unwrap_or(0) as u128, n64.checked_rem(dlo).unwrap_or(n64) as u128);
    }
    let shift = d.leading_zeros() - n.leading_zeros();
    let mut d_shifted = d << shift;
    let mut rem = n;
    let mut quot: u128 = 0;
    let mut i = shift + 1;
    while i > 0 {
        quot <<= 1;
        if rem >= d_shifted {
            rem -= d_shifted;
            quot |= 1;
        }
        d_shifted >>= 1;
        i -= 1;
    }
    (quot, rem)
}

#[no_mangle]
pub extern "C" fn __udivti3(n: u128, d: u128) -> u128 {
    udivmod(n, d).0
}

#[no_mangle]
pub extern "C" fn __umodti3(n: u128, d: u128) -> u128 {
    udivmod(n, d).1
}

#[no_mangle]
pub extern "C" fn __divti3(n: i128, d: i128) -> i128 {
    let q = udivmod(n.unsigned_abs(), d.unsigned_abs()).0 as i128;
    if (n < 0) != (d < 0) { q.wrapping_neg() } else { q }
}

#[no_mangle]
pub extern "C" fn __modti3(n: i128, d: i128) -> i128 {
    let r = udivmod(n.unsigned_abs(), d.unsigned_abs()).1 as i128;
    if n < 0 { r.wrapping_neg() } else { r }
}
