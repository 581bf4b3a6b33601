//! {{name}}: module parameters, declared in Cargo.toml and read with `rustko::param`.
#![no_std]

use rustko::param;
use rustko::prelude::*;

struct Module;

impl rustko::Module for Module {
    fn init() -> Result<Self> {
        let count = param::int("count")?;
        if !(0..=100).contains(&count) {
            pr_err!("count={} is out of range 0..=100", count);
            return Err(code::EINVAL);
        }
        let mut greeting = param::string("greeting")?;
        if param::boolean("shout")? {
            greeting.make_ascii_uppercase();
        }
        for i in 1..=count {
            pr_info!("{} #{}", greeting, i);
        }
        Ok(Module)
    }
}

rustko::module!(Module);
