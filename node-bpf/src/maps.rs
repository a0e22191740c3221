//! Rust mirrors of the map types in `lib/*.h`. Field order, widths and padding must match the C
//! structs exactly; `tests/btf_layout.rs` compares them with the BTF clang emitted.

/// Name of the per-endpoint counters map (`lib/counters.h`).
pub const ENDPOINT_COUNTERS: &str = "endpoint_counters";

/// Which way a packet went, seen from the endpoint (`enum endpoint_direction`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Sent by the pod.
    FromEndpoint = 0,
    /// Delivered to the pod.
    ToEndpoint = 1,
}

/// `struct endpoint_counter_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointCounterKey {
    /// Interface index of the endpoint's host-side veth.
    pub ifindex: u32,
    /// A [`Direction`] as its number.
    pub direction: u32,
}

impl EndpointCounterKey {
    pub fn new(ifindex: u32, direction: Direction) -> Self {
        Self {
            ifindex,
            direction: direction as u32,
        }
    }
}

/// `struct traffic_counters`: one CPU's share of an endpoint's traffic in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Layer-2 bytes, Ethernet header included.
    pub bytes: u64,
}

impl std::ops::Add for TrafficCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: both types are `repr(C)`, made only of integers, with no padding (checked against
// the BTF by tests/btf_layout.rs), so every bit pattern is a valid value.
unsafe impl aya::Pod for EndpointCounterKey {}
// SAFETY: as above.
unsafe impl aya::Pod for TrafficCounters {}
