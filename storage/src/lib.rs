//! Storage for microvm-dev guests: [`block::Block`], a virtio-blk device
//! over a raw image file, and [`fs`], virtio-fs: a FUSE server in the VMM
//! over an overlay of a host directory, or a vhost-user-fs frontend for
//! virtiofsd.

pub mod block;
pub mod fs;

use std::path::PathBuf;

/// Errors of the storage crate: each names the disk image and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("share source \"{}\": cannot watch it for changes: {source}", path.display())]
    Watch { path: PathBuf, source: std::io::Error },
    #[error("disk \"{}\": cannot open: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk \"{}\": size {size} bytes is not a multiple of 512; resize the image (e.g. truncate -s %512)", path.display())]
    Size { path: PathBuf, size: u64 },
    #[error("disk \"{}\": serial {serial:?} is longer than 20 bytes", path.display())]
    Serial { path: PathBuf, serial: String },
    #[error("virtiofsd not found (looked at {searched}); run scripts/setup-host.sh or `cargo install --locked virtiofsd`, or give its path")]
    VirtiofsdNotFound { searched: String },
    #[error("virtiofsd {} for \"{}\": {reason}", binary.display(), shared_dir.display())]
    VirtiofsdStart {
        binary: PathBuf,
        shared_dir: PathBuf,
        reason: String,
    },
    #[error("virtio-fs \"{tag}\": vhost-user backend at {}: {reason}", socket.display())]
    VhostUser {
        tag: String,
        socket: PathBuf,
        reason: String,
    },
    #[error("overlay of \"{}\" at {}: {reason}", lower.display(), merged.display())]
    HostOverlay {
        lower: PathBuf,
        merged: PathBuf,
        reason: String,
    },
    #[error("virtio-fs layer directory \"{}\": {source}; it must be an existing directory we can read", path.display())]
    Layer { path: PathBuf, source: std::io::Error },
    #[error("virtio-fs layers \"{}\" (lower) and \"{}\" (upper) must not contain one another; put the upper layer outside the project directory", lower.display(), upper.display())]
    LayersNested { lower: PathBuf, upper: PathBuf },
    #[error("virtio-fs tag {tag:?} must be 1 to 36 bytes without NUL or control characters")]
    FsTag { tag: String },
}
