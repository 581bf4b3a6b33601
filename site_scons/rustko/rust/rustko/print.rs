//! `pr_info!` and friends: `core::fmt` into a fixed buffer (no allocation), then one printk.
use core::fmt::{self, Write};

use crate::ffi;

pub const EMERG: i32 = 0;
pub const ALERT: i32 = 1;
pub const CRIT: i32 = 2;
pub const ERR: i32 = 3;
pub const WARNING: i32 = 4;
pub const NOTICE: i32 = 5;
pub const INFO: i32 = 6;
pub const DEBUG: i32 = 7;

/// printk's own record limit is about 1 KB; longer lines are cut, never overflowed.
const LINE: usize = 512;

struct Line {
    buf: [u8; LINE],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(LINE - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// What the `pr_*!` macros call; the C runtime adds the module name and the newline.
pub fn log(level: i32, args: fmt::Arguments<'_>) {
    let mut line = Line { buf: [0; LINE], len: 0 };
    let _ = line.write_fmt(args);
    // SAFETY: buf[..len] is initialised; the runtime copies it before returning.
    unsafe { ffi::rustko_printk(level, line.buf.as_ptr(), line.len as _) };
}

#[macro_export]
macro_rules! pr_emerg { ($($arg:tt)*) => { $crate::print::log($crate::print::EMERG, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_alert { ($($arg:tt)*) => { $crate::print::log($crate::print::ALERT, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_crit { ($($arg:tt)*) => { $crate::print::log($crate::print::CRIT, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_err { ($($arg:tt)*) => { $crate::print::log($crate::print::ERR, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_warn { ($($arg:tt)*) => { $crate::print::log($crate::print::WARNING, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_notice { ($($arg:tt)*) => { $crate::print::log($crate::print::NOTICE, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_info { ($($arg:tt)*) => { $crate::print::log($crate::print::INFO, format_args!($($arg)*)) }; }
#[macro_export]
macro_rules! pr_debug { ($($arg:tt)*) => { $crate::print::log($crate::print::DEBUG, format_args!($($arg)*)) }; }
