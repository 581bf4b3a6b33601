//! A panic logs its message and location, then does what the in-kernel Rust support does: BUG().
use core::fmt::{self, Write};
use core::panic::PanicInfo;

use crate::{ffi, pr_emerg};

/// `PanicInfo`'s own text ("panicked at FILE:LINE:COL:\nMESSAGE" from rustc 1.78 to today) on
/// one log line: `PanicInfo::message()` only exists since rustc 1.81.
struct OneLine<'a>(&'a PanicInfo<'a>);

/// Writes through to a formatter with every newline turned into a space.
struct Flat<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for Flat<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for (index, part) in s.split('\n').enumerate() {
            if index > 0 {
                self.0.write_str(" ")?;
            }
            self.0.write_str(part)?;
        }
        Ok(())
    }
}

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Flat(f), "{}", self.0)
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    pr_emerg!("{}", OneLine(info));
    // SAFETY: BUG() does not return.
    unsafe { ffi::rustko_bug() }
}
