//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and the host-side
//! `CONNECT <port>` line, both parsed from untrusted bytes.

/// Size of the header in front of every packet.
pub const HDR_LEN: usize = 44;

/// The host's context id: the guest reaches host services at CID 2.
pub const HOST_CID: u64 = 2;

/// `type`: stream socket, the only kind offered (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// One packet header, all fields little endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload length following the header.
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Longest `CONNECT <port>\n` line accepted from a host client.
pub const MAX_CONNECT_LINE: usize = 32;

/// What a host client's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectLine {
    /// `CONNECT <port>\n`; `len` counts the bytes up to and including the newline.
    Connect { port: u32, len: usize },
    /// No newline yet and still short enough: wait for more bytes.
    Incomplete,
    /// Anything else: the client is closed.
    Invalid,
}

/// Parse the start of what a host client sent (Firecracker's protocol:
/// `CONNECT <decimal port>\n`, nothing else on the line).
pub fn parse_connect_line(bytes: &[u8]) -> ConnectLine {
    let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
        return if bytes.len() < MAX_CONNECT_LINE {
            ConnectLine::Incomplete
        } else {
            ConnectLine::Invalid
        };
    };
    if newline >= MAX_CONNECT_LINE {
        return ConnectLine::Invalid;
    }
    let line = &bytes[..newline];
    let Some(digits) = line.strip_prefix(b"CONNECT ") else {
        return ConnectLine::Invalid;
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return ConnectLine::Invalid;
    }
    let port = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match u32::try_from(port) {
        Ok(port) => ConnectLine::Connect { port, len: newline + 1 },
        Err(_) => ConnectLine::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 4096,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 262_144,
            fwd_cnt: 0xffff_ffff,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn connect_lines() {
        assert_eq!(
            parse_connect_line(b"CONNECT 52\nhello"),
            ConnectLine::Connect { port: 52, len: 11 }
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\n"),
            ConnectLine::Connect {
                port: u32::MAX,
                len: 19
            }
        );
        assert_eq!(parse_connect_line(b"CONNECT 5"), ConnectLine::Incomplete);
        assert_eq!(parse_connect_line(b""), ConnectLine::Incomplete);
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 5 \n",
            b"connect 5\n",
            b"CONNECT 99999999999999999999\n",
            b"\n",
            &[b'x'; MAX_CONNECT_LINE],
        ] {
            assert_eq!(
                parse_connect_line(bad),
                ConnectLine::Invalid,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
