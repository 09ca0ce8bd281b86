//! Guest input: any sequence of port reads and writes of any width to the
//! legacy devices (UART, i8042, ACPI sleep control, CMOS RTC) must not
//! panic.
#![no_main]
use std::sync::atomic::{AtomicI64, Ordering};
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
    // The RTC on a clock the input moves (the host's would make runs
    // irreproducible), starting in 2026.
    let now = Arc::new(AtomicI64::new(1_795_758_099_000_000_000));
    let clock = now.clone();
    let rtc = Rtc::with_clock(Box::new(move || i128::from(clock.load(Ordering::Relaxed))));
    bus.insert(
        "rtc",
        RTC_PORT_BASE.into(),
        RTC_PORT_LEN.into(),
        Arc::new(Mutex::new(rtc)),
    )
    .unwrap();
    // Each operation: [kind, port selector, width, value bytes...].
    let mut ops = data;
    while ops.len() >= 3 {
        let (kind, sel, width) = (ops[0], ops[1], usize::from(ops[2] % 5));
        ops = &ops[3..];
        let port = match sel % 5 {
            0 => COM1_PORT_BASE + u16::from(sel / 5) % 10,
            1 => I8042_PORT_BASE + u16::from(sel / 5) % 6,
            2 => SLEEP_CONTROL_PORT + u16::from(sel / 5) % 2,
            3 => RTC_PORT_BASE + u16::from(sel / 5) % 3,
            _ => u16::from(sel) << 4,
        };
        let take = width.min(ops.len());
        let (value, rest) = ops.split_at(take);
        ops = rest;
        match kind % 4 {
            0 => {
                bus.write(u64::from(port), value);
            }
            1 => {
                let mut buf = vec![0u8; width];
                bus.read(u64::from(port), &mut buf);
            }
            2 => {
                serial.lock().unwrap().enqueue_input(value);
            }
            _ => {
                // Time passes: up to 72 minutes in microseconds, or up to
                // 49 whole days.
                let step = value.iter().fold(0i64, |a, b| a << 8 | i64::from(*b));
                let ns = if kind & 0x80 != 0 {
                    step % 50 * 86_400_000_000_000
                } else {
                    step * 1_000
                };
                now.fetch_add(ns, Ordering::Relaxed);
            }
        }
    }
});
