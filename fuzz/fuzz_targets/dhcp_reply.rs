//! DHCP replies from the network, which the guest agent parses while it
//! configures an interface (`mvm.dhcp=`). Any bytes give a lease, a
//! refusal or an error, never a panic; an accepted lease is one the agent
//! can apply safely (contiguous netmask, unicast address, a search domain
//! that cannot add lines to resolv.conf).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mvm_agent::dhcp::{self, Reply};
use mvm_agent::netif;

fuzz_target!(|data: &[u8]| {
    // Take the transaction id and MAC from the reply itself, so that the
    // fuzzer gets past the "is it ours" check.
    let xid = data.get(4..8).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut mac = [0u8; 6];
    if let Some(m) = data.get(28..34) {
        mac.copy_from_slice(m);
    }
    let lease = match dhcp::parse_reply(data, xid, mac) {
        Ok(Reply::Offer(lease) | Reply::Ack(lease)) => lease,
        Ok(Reply::Nak(message)) => {
            assert!(message.is_none_or(|m| m.bytes().all(|b| b.is_ascii_graphic() || b == b' ')));
            return;
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!((1..=32).contains(&lease.prefix_len));
    assert_eq!(u32::from(lease.netmask()).leading_ones(), u32::from(lease.prefix_len));
    assert!(!lease.address.is_unspecified() && !lease.address.is_broadcast() && !lease.address.is_multicast());
    let _ = lease.to_string();
    if let Some(text) = netif::resolv_conf_text("eth0", &lease) {
        let expected = 1 + usize::from(lease.domain.is_some()) + lease.dns.len();
        assert_eq!(text.lines().count(), expected, "{text:?}");
    }
});
