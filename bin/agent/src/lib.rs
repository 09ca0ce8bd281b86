//! `mvm-agent`: the microvm-dev guest agent, and the protocol the host
//! speaks to it ([`proto`]), shared by both ends.
//!
//! The agent runs in the guest, normally as PID 1; the host (`mvm`, or any
//! program using the `mvm` library) connects to it over vsock port
//! [`proto::AGENT_PORT`].

pub mod proto;
