//! Reconciles `BandwidthClass`: checks what the schema cannot (rates are numbers of bits per
//! second that fit, `guaranteedRate ≤ maxRate`), writes the status (kstatus conditions, see
//! [`crate::conditions`]) only when it changed, and publishes a Warning Event when a class
//! turns invalid. Never writes a spec.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use weft_crds::bandwidth::{BandwidthClassStatus, EgressBandwidth, BANDWIDTH_CLASS_ANNOTATION};
use weft_crds::{BandwidthClass, BandwidthClassSpec};

use crate::conditions::{self, ErrorBackoff, Finding, Outcome, REPORTER};
use crate::metrics::ReconcileMetrics;

const KIND: &str = "BandwidthClass";
/// Re-check classes this often even without events (cheap: no write when nothing changed).
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the status of BandwidthClass {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub backoff: ErrorBackoff,
}

impl Context {
    pub fn new(client: Client) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), REPORTER.into()),
            client,
            backoff: ErrorBackoff::default(),
        }
    }
}

/// A rate in bits per second from a Kubernetes-style quantity: digits with an optional
/// fraction and an optional unit (`k`, `M`, `G`, `T` are powers of 1000; `Ki`, `Mi`, `Gi`,
/// `Ti` powers of 1024). `1.5G` is 1,500,000,000. Fractions of a bit are dropped.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u128 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}: use k, M, G, T, Ki, Mi, Gi or Ti"
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (number.contains('.') && !digits(fraction)) {
        return Err(format!(
            "{text:?} is not a rate: write bits per second as a number with an optional unit, \
             e.g. 500M or 2.5G"
        ));
    }
    let too_large = || {
        format!(
            "{text:?} is too large: at most {} bits per second",
            u64::MAX
        )
    };
    if whole.len() > 20 {
        return Err(too_large());
    }
    // Digits past the 12th after the point cannot matter at a resolution of one bit.
    let fraction = &fraction[..fraction.len().min(12)];
    let scale = 10u128.pow(fraction.len() as u32);
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let bits = whole
        .checked_mul(scale)
        .and_then(|scaled| scaled.checked_add(fraction))
        .and_then(|scaled| scaled.checked_mul(multiplier))
        .map(|scaled| scaled / scale)
        .ok_or_else(too_large)?;
    u64::try_from(bits).map_err(|_| too_large())
}

/// The checks the CRD schema cannot express. `Err` names the field and says what to write.
pub fn validate(spec: &BandwidthClassSpec) -> Result<(), Finding> {
    let EgressBandwidth {
        max_rate,
        guaranteed_rate,
        ..
    } = &spec.egress;
    let max = parse_rate(max_rate)
        .map_err(|message| Finding::new("BadRate", format!("spec.egress.maxRate: {message}")))?;
    if max == 0 {
        return Err(Finding::new(
            "BadRate",
            format!(
                "spec.egress.maxRate: {max_rate:?} is less than one bit per second: a pod of \
                 this class could send nothing"
            ),
        ));
    }
    if let Some(guaranteed_rate) = guaranteed_rate {
        let guaranteed = parse_rate(guaranteed_rate).map_err(|message| {
            Finding::new("BadRate", format!("spec.egress.guaranteedRate: {message}"))
        })?;
        if guaranteed > max {
            return Err(Finding::new(
                "GuaranteedRateAboveMaxRate",
                format!(
                    "spec.egress.guaranteedRate: {guaranteed_rate} is more than maxRate \
                     {max_rate}: lower guaranteedRate or raise maxRate"
                ),
            ));
        }
    }
    Ok(())
}

/// What a class's validation means for its status.
pub fn outcome(spec: &BandwidthClassSpec) -> Outcome {
    match validate(spec) {
        Ok(()) => Outcome::Ready {
            valid: "the class is valid".into(),
            ready: Finding::new(
                "Accepted",
                format!("pods join the class with the {BANDWIDTH_CLASS_ANNOTATION} annotation"),
            ),
        },
        Err(invalid) => Outcome::Invalid {
            not_ready: format!(
                "not applied; pods of this class keep their previous limits: {}",
                invalid.message
            ),
            invalid,
        },
    }
}

pub async fn reconcile(class: Arc<BandwidthClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = class.name_any();
    let generation = class.meta().generation;
    let outcome = outcome(&class.spec);
    let current = class.status.clone().unwrap_or_default();
    let api: Api<BandwidthClass> = Api::all(ctx.client.clone());
    let wrote = conditions::update_status(
        &api,
        &name,
        KIND,
        generation,
        (current.observed_generation, &current.conditions),
        &outcome,
        &[],
        |observed_generation, conditions| BandwidthClassStatus {
            observed_generation,
            conditions,
            pods: None,
        },
    )
    .await
    .map_err(|source| Error::WriteStatus {
        name: name.clone(),
        source,
    })?;
    if wrote {
        conditions::warn_if_invalid(&ctx.recorder, &class.object_ref(&()), KIND, &outcome).await;
    }
    ctx.backoff.succeeded(&ErrorBackoff::key(class.as_ref()));
    Ok(Action::requeue(RESYNC))
}

pub fn error_policy(class: Arc<BandwidthClass>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&ErrorBackoff::key(class.as_ref()));
    tracing::warn!(%error, retry_in = ?delay, "BandwidthClass reconcile failed");
    Action::requeue(delay)
}

/// Runs the BandwidthClass controller until the process stops.
///
/// RBAC: `bandwidthclasses` list, watch; `bandwidthclasses/status` patch; `events`
/// (`events.k8s.io`) create, patch.
pub async fn run(client: Client, metrics: ReconcileMetrics) {
    let ctx = Arc::new(Context::new(client.clone()));
    Controller::new(
        Api::<BandwidthClass>::all(client),
        watcher::Config::default(),
    )
    .run(
        metrics.instrument("bandwidthclass", reconcile),
        error_policy,
        ctx,
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "BandwidthClass reconcile");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: &str, guaranteed: Option<&str>) -> BandwidthClassSpec {
        BandwidthClassSpec {
            egress: EgressBandwidth {
                max_rate: max.into(),
                guaranteed_rate: guaranteed.map(Into::into),
                weight: 100,
                priority: 4,
            },
        }
    }

    #[test]
    fn rates_are_bits_per_second_with_decimal_and_binary_units() {
        assert_eq!(parse_rate("500M"), Ok(500_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("25Gi"), Ok(25 << 30));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("0.5k"), Ok(500));
        assert_eq!(parse_rate("0.0001"), Ok(0));
        for bad in ["", "G", "1.G", ".5G", "1,5G", "10g", "10 G", "-1", "1e9"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
        assert!(parse_rate("99999999T")
            .expect_err("overflows u64")
            .contains("too large"));
        assert!(parse_rate("1234567890123456789012").is_err());
        assert!(
            parse_rate("99999999999999999999.999999999999Ti").is_err(),
            "no overflow"
        );
    }

    #[test]
    fn a_guaranteed_rate_above_the_maximum_is_invalid() {
        assert_eq!(validate(&spec("10G", Some("10G"))), Ok(()));
        let error = validate(&spec("10G", Some("20G"))).expect_err("20G > 10G");
        assert_eq!(error.reason, "GuaranteedRateAboveMaxRate");
        assert!(error.message.starts_with("spec.egress.guaranteedRate:"));
        // Units differ but the comparison is on bits.
        assert_eq!(validate(&spec("1Gi", Some("1G"))), Ok(()));
        assert!(validate(&spec("1G", Some("1Gi"))).is_err());
    }

    #[test]
    fn a_rate_of_nothing_or_no_number_is_invalid() {
        let zero = validate(&spec("0", None)).expect_err("zero");
        assert_eq!(zero.reason, "BadRate");
        let bad = validate(&spec("fast", None)).expect_err("not a rate");
        assert!(bad.message.starts_with("spec.egress.maxRate:"), "{bad:?}");
        let bad = validate(&spec("1G", Some("lots"))).expect_err("not a rate");
        assert!(bad.message.starts_with("spec.egress.guaranteedRate:"));
    }
}
