//! Guest input: any sequence of port reads and writes of any width to the
//! legacy devices (UART, i8042, ACPI sleep control) must not panic.
#![no_main]
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mvm_devices::bus::pio_bus;
use mvm_devices::legacy::*;

fuzz_target!(|data: &[u8]| {
    let serial = Arc::new(Mutex::new(SerialPort::new(Box::new(std::io::sink())).unwrap()));
    let reset = Arc::new(Mutex::new(ResetController::new().unwrap()));
    let sleep = Arc::new(Mutex::new(AcpiSleepControl::new().unwrap()));
    let mut bus = pio_bus();
    bus.insert("serial", COM1_PORT_BASE.into(), COM1_PORT_LEN.into(), serial.clone())
        .unwrap();
    bus.insert("i8042", I8042_PORT_BASE.into(), I8042_PORT_LEN.into(), reset)
        .unwrap();
    bus.insert("sleep", SLEEP_CONTROL_PORT.into(), 1, sleep).unwrap();
    // Each operation: [kind, port selector, width, value bytes...].
    let mut ops = data;
    while ops.len() >= 3 {
        let (kind, sel, width) = (ops[0], ops[1], usize::from(ops[2] % 5));
        ops = &ops[3..];
        let port = match sel % 4 {
            0 => COM1_PORT_BASE + u16::from(sel >> 2) % 10,
            1 => I8042_PORT_BASE + u16::from(sel >> 2) % 6,
            2 => SLEEP_CONTROL_PORT + u16::from(sel >> 2) % 2,
            _ => u16::from(sel) << 4,
        };
        let take = width.min(ops.len());
        let (value, rest) = ops.split_at(take);
        ops = rest;
        match kind % 3 {
            0 => {
                bus.write(u64::from(port), value);
            }
            1 => {
                let mut buf = vec![0u8; width];
                bus.read(u64::from(port), &mut buf);
            }
            _ => {
                serial.lock().unwrap().enqueue_input(value);
            }
        }
    }
});
