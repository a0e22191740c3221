//! Loads the pod programs into the kernel, attaches them to a pod's host-side veth with tcx,
//! and reads what they counted.

use aya::maps::PerCpuHashMap;
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::LinkOrder;
use aya::Ebpf;
use weft_node_bpf::maps::{Direction, EndpointCounterKey, TrafficCounters, ENDPOINT_COUNTERS};
use weft_node_bpf::{programs, POD_OBJECT};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the kernel refused Weft's pod programs: {0}; check that it has BPF and BTF support (CONFIG_BPF_SYSCALL, CONFIG_DEBUG_INFO_BTF) and that the agent runs privileged")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the pod object has no program {0:?}; the build embedded a stale object")]
    MissingProgram(&'static str),
    #[error("program {name} failed to load or verify: {source}")]
    Verify {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach {name} to {interface} ({direction}) with tcx: {source}; tcx needs Linux 6.6 or later and the interface must exist in the agent's network namespace")]
    Attach {
        name: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot list the tcx programs on {interface}: {source}")]
    Query {
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the pod object has no map {0:?}; the build embedded a stale object")]
    MissingMap(&'static str),
    #[error("map {name} cannot be read: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// What one endpoint sent and received, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointTraffic {
    pub sent: TrafficCounters,
    pub received: TrafficCounters,
}

/// The pod programs, loaded and verified. Attachments live as long as this value: dropping it
/// detaches them.
pub struct PodDatapath {
    ebpf: Ebpf,
}

impl PodDatapath {
    /// Loads the object and runs both programs through the verifier.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf =
            Ebpf::load(POD_OBJECT).map_err(|error| DatapathError::Load(Box::new(error)))?;
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Verify {
                    name,
                    source: Box::new(source),
                })?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches to the host side of a pod's veth, which must be in the calling thread's network
    /// namespace: `from_container` on its ingress, `to_container` on its egress. tcx links
    /// compose with other tcx programs instead of replacing a clsact filter.
    pub fn attach(&mut self, host_veth: &str) -> Result<(), DatapathError> {
        for (name, attach_type, direction) in [
            (programs::FROM_CONTAINER, TcAttachType::Ingress, "ingress"),
            (programs::TO_CONTAINER, TcAttachType::Egress, "egress"),
        ] {
            classifier(&mut self.ebpf, name)?
                .attach_with_options(
                    host_veth,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|source| DatapathError::Attach {
                    name,
                    interface: host_veth.to_owned(),
                    direction,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The traffic counted for the endpoint behind the host-side veth `ifindex`.
    pub fn traffic(&self, ifindex: u32) -> Result<EndpointTraffic, DatapathError> {
        let map = self
            .ebpf
            .map(ENDPOINT_COUNTERS)
            .ok_or(DatapathError::MissingMap(ENDPOINT_COUNTERS))?;
        let counters: PerCpuHashMap<_, EndpointCounterKey, TrafficCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: ENDPOINT_COUNTERS,
                source: Box::new(source),
            })?;
        let sum = |direction| -> Result<TrafficCounters, DatapathError> {
            match counters.get(&EndpointCounterKey::new(ifindex, direction), 0) {
                Ok(per_cpu) => Ok(per_cpu
                    .iter()
                    .copied()
                    .fold(TrafficCounters::default(), |total, cpu| total + cpu)),
                // No packet seen yet in this direction.
                Err(aya::maps::MapError::KeyNotFound) => Ok(TrafficCounters::default()),
                Err(source) => Err(DatapathError::Map {
                    name: ENDPOINT_COUNTERS,
                    source: Box::new(source),
                }),
            }
        };
        Ok(EndpointTraffic {
            sent: sum(Direction::FromEndpoint)?,
            received: sum(Direction::ToEndpoint)?,
        })
    }
}

/// Names of the tcx programs attached to `interface` (in the calling thread's namespace), in
/// run order: `ingress` true for the ingress hook, false for egress.
pub fn attached_programs(interface: &str, ingress: bool) -> Result<Vec<String>, DatapathError> {
    let attach_type = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    let (_revision, programs) =
        SchedClassifier::query_tcx(interface, attach_type).map_err(|source| {
            DatapathError::Query {
                interface: interface.to_owned(),
                source: Box::new(source),
            }
        })?;
    Ok(programs
        .iter()
        .map(|program| program.name_as_str().unwrap_or("<unnamed>").to_owned())
        .collect())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}
