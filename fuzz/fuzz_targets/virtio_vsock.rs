//! Guest and host input of virtio-vsock: transmit and receive queues in
//! fuzzer-chosen guest memory (rings at fixed places, descriptors and
//! packets chosen by the fuzzer; a host program listens on port 1 so
//! guest connections get somewhere) and the same bytes as a host client's
//! `CONNECT` line. Nothing may panic: packets are answered, reset or fail
//! the device.
#![no_main]
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use mvm_devices::virtio::vsock::packet::{parse_connect_line, ConnectLine, MAX_CONNECT_LINE};
use mvm_devices::virtio::vsock::Vsock;
use mvm_devices::virtio::VirtioDevice;
use mvm_fuzz::queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct Fixture {
    dev: Vsock,
    port1: UnixListener,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvm-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds: PathBuf = dir.join("v.sock");
        let port1 = UnixListener::bind(format!("{}_1", uds.display())).unwrap();
        port1.set_nonblocking(true).unwrap();
        Mutex::new(Fixture {
            dev: Vsock::new(3, &uds).unwrap(),
            port1,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    if let ConnectLine::Connect { len, .. } = parse_connect_line(data) {
        assert!(len <= MAX_CONNECT_LINE && data[len - 1] == b'\n');
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    mem.write_slice(&data[..data.len().min(0x1_0000)], GuestAddress(0))
        .unwrap();
    let mut f = fixture().lock().unwrap_or_else(|e| e.into_inner());
    // Every run starts without connections; drop what the last one made.
    f.dev.reset();
    while f.port1.accept().is_ok() {}
    let mut queues = [queue(0x1000), queue(0x2000), queue(0x3000)];
    let _ = f.dev.queue_notified(1, &mut queues, &mem);
    let _ = f.dev.queue_notified(0, &mut queues, &mem);
});
