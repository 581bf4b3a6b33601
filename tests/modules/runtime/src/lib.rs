//! Exercises the support crate's runtime in a real kernel: the 128-bit integer helpers, the
//! allocation-failure paths (reported as ENOMEM, no crash), and a panic (message + location).
#![no_std]

use core::hint::black_box;

use rustko::param;
use rustko::prelude::*;

struct Runtime {
    kept: Box<[u64; 4]>,
}

fn arithmetic() {
    let a: u128 = black_box(u128::MAX);
    let b: u128 = black_box(18_446_744_073_709_551_629);
    pr_info!("u128 {} / {} = {} rem {}", a, b, a / b, a % b);
    let c: i128 = black_box(i128::MIN + 1);
    let d: i128 = black_box(-7);
    pr_info!("i128 {} / {} = {} rem {}", c, d, c / d, c % d);
}

fn allocation_failures() -> Result {
    let mut huge: Vec<u8> = Vec::new();
    match huge.try_reserve(black_box(1 << 40)) {
        Err(err) => pr_info!("try_reserve(1 TiB): {:?}", Error::from(err)),
        Ok(()) => pr_err!("try_reserve(1 TiB) succeeded"),
    }
    let mut small: Vec<u32> = Vec::new();
    for n in 0..1000 {
        small.try_push(n)?;
    }
    pr_info!("try_push x1000: len {}, sum {}", small.len(), small.iter().map(|&n| n as u64).sum::<u64>());
    Ok(())
}

impl rustko::Module for Runtime {
    fn init() -> Result<Self> {
        arithmetic();
        allocation_failures()?;
        if param::boolean("panic")? {
            let table = [1u32, 2, 3];
            let index = black_box(7);
            pr_info!("about to panic: {}", table[index]);
        }
        let kept = try_box([1, 2, 3, 4])?;
        Ok(Runtime { kept })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        pr_info!("runtime unloaded, kept {:?}", self.kept);
    }
}

rustko::module!(Runtime);
