//! The module's life cycle: `init` builds the module's state, dropping it is `module_exit`.

/// A kernel module. `init` runs at insmod (an `Err` fails the insmod with that errno); the value
/// it returns lives until rmmod, when it is dropped.
pub trait Module: Sized {
    fn init() -> crate::Result<Self>;
}

/// Declares the module's type; generates the `rust_init`/`rust_exit` the C shim calls.
///
/// ```ignore
/// struct Hello;
/// impl rustko::Module for Hello { fn init() -> rustko::Result<Self> { Ok(Hello) } }
/// rustko::module!(Hello);
/// ```
#[macro_export]
macro_rules! module {
    ($t:ty) => {
        static mut __RUSTKO_MODULE: core::mem::MaybeUninit<$t> = core::mem::MaybeUninit::uninit();

        #[no_mangle]
        pub extern "C" fn rust_init() -> i32 {
            match <$t as $crate::Module>::init() {
                Ok(module) => {
                    // SAFETY: module_init runs once, before anything else can see the state.
                    unsafe { (*core::ptr::addr_of_mut!(__RUSTKO_MODULE)).write(module) };
                    0
                }
                Err(err) => err.to_errno(),
            }
        }

        #[no_mangle]
        pub extern "C" fn rust_exit() {
            // SAFETY: module_exit runs once, only after a successful module_init.
            unsafe { (*core::ptr::addr_of_mut!(__RUSTKO_MODULE)).assume_init_drop() };
        }
    };
}
