//! A line of kernel log, formatted in a fixed buffer (no allocator needed).
use core::fmt;

extern "C" {
    /// From rustko's C shim: logs `len` bytes at a printk level (0 emerg .. 7 debug).
    fn rustko_printk(level: i32, msg: *const u8, len: usize);
}

const INFO: i32 = 6;
const ERR: i32 = 3;

pub struct KernelLog {
    level: i32,
    buf: [u8; 200],
    len: usize,
}

impl KernelLog {
    pub fn info() -> Self {
        Self { level: INFO, buf: [0; 200], len: 0 }
    }

    pub fn error() -> Self {
        Self { level: ERR, buf: [0; 200], len: 0 }
    }

    /// Sends the line to the kernel log; text beyond the buffer was cut, never overflowed.
    pub fn flush(&mut self) {
        // SAFETY: buf[..len] is initialised and the shim copies it before returning.
        unsafe { rustko_printk(self.level, self.buf.as_ptr(), self.len) };
        self.len = 0;
    }
}

impl fmt::Write for KernelLog {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
