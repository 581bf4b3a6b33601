//! {{name}}: a misc character device, /dev/{{name}}, that gives back what was last written to it.
#![no_std]

use rustko::miscdev::{FileOps, MiscDevice, UserReader, UserWriter};
use rustko::prelude::*;
use rustko::sync::Mutex;

/// The most a write keeps; longer writes are refused with ENOSPC.
const CAPACITY: usize = 4096;

struct Echo {
    data: Mutex<Vec<u8>>,
}

impl FileOps for Echo {
    fn read(&self, out: &mut UserWriter, offset: u64) -> Result<usize> {
        let data = self.data.lock();
        let start = (offset as usize).min(data.len());
        out.write(&data[start..])
    }

    fn write(&self, input: &mut UserReader, _offset: u64) -> Result<usize> {
        let len = input.remaining();
        if len > CAPACITY {
            return Err(code::ENOSPC);
        }
        let mut incoming = Vec::new();
        incoming.try_reserve_exact(len)?;
        incoming.resize(len, 0);
        input.read(&mut incoming)?;
        *self.data.lock() = incoming;
        Ok(len)
    }
}

struct Module {
    _device: MiscDevice<Echo>,
}

impl rustko::Module for Module {
    fn init() -> Result<Self> {
        let device = MiscDevice::register("{{name}}", Echo { data: Mutex::new(Vec::new())? })?;
        pr_info!("/dev/{{name}} is ready");
        Ok(Module { _device: device })
    }
}

rustko::module!(Module);
