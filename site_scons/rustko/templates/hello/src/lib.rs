//! {{name}}: logs a line with `core::fmt` when loaded and another when unloaded.
#![no_std]

use rustko::prelude::*;

struct Module {
    primes: Vec<u32>,
}

impl rustko::Module for Module {
    fn init() -> Result<Self> {
        let mut primes = Vec::new();
        for p in [7, 2, 5, 3] {
            primes.try_push(p)?;
        }
        primes.sort_unstable();
        pr_info!("hello from Rust: primes {:?}, sum {}", primes, primes.iter().sum::<u32>());
        Ok(Module { primes })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        pr_info!("goodbye from Rust ({} primes)", self.primes.len());
    }
}

rustko::module!(Module);
