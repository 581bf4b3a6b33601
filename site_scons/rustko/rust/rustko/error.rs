//! Errors as the kernel sees them: a negative errno.
use core::fmt;

/// A kernel error code; `to_errno()` is what `rust_init` and file operations return.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Error(i32);

pub type Result<T = ()> = core::result::Result<T, Error>;

impl Error {
    /// `errno` may be given either way round (`-12` or `12`).
    pub const fn from_errno(errno: i32) -> Self {
        Error(if errno > 0 { -errno } else { errno })
    }

    pub const fn to_errno(self) -> i32 {
        self.0
    }

    fn name(self) -> Option<&'static str> {
        code::NAMES.iter().find(|(e, _)| *e == self).map(|(_, n)| *n)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Error({})", self.0),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<core::alloc::AllocError> for Error {
    fn from(_: core::alloc::AllocError) -> Self {
        code::ENOMEM
    }
}

impl From<alloc_crate::collections::TryReserveError> for Error {
    fn from(_: alloc_crate::collections::TryReserveError) -> Self {
        code::ENOMEM
    }
}

/// include/uapi/asm-generic/errno-base.h and errno.h: the same numbers on every architecture
/// rustko supports.
pub mod code {
    use super::Error;

    pub const EPERM: Error = Error(-1);
    pub const ENOENT: Error = Error(-2);
    pub const EIO: Error = Error(-5);
    pub const EAGAIN: Error = Error(-11);
    pub const ENOMEM: Error = Error(-12);
    pub const EFAULT: Error = Error(-14);
    pub const EBUSY: Error = Error(-16);
    pub const EEXIST: Error = Error(-17);
    pub const ENODEV: Error = Error(-19);
    pub const EINVAL: Error = Error(-22);
    pub const ENOSPC: Error = Error(-28);
    pub const ERANGE: Error = Error(-34);

    pub(super) const NAMES: [(Error, &str); 12] = [
        (EPERM, "EPERM"), (ENOENT, "ENOENT"), (EIO, "EIO"), (EAGAIN, "EAGAIN"),
        (ENOMEM, "ENOMEM"), (EFAULT, "EFAULT"), (EBUSY, "EBUSY"), (EEXIST, "EEXIST"),
        (ENODEV, "ENODEV"), (EINVAL, "EINVAL"), (ENOSPC, "ENOSPC"), (ERANGE, "ERANGE"),
    ];
}
