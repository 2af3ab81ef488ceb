//! Kafka in and out, exactly once.
//!
//! - [`KafkaSource`]: a direct stream over topics (names or a pattern) whose per-partition offset
//!   ranges are planned before each batch, logged by cairn and kept in the checkpoint.
//! - [`Decode`]: records into the job's types; a record that does not decode fails the batch or
//!   goes to a dead-letter stream.
//! - [`Membership`]: one process's place in a job that runs on several: the consumer group
//!   assigns it tasks (partitions of the anchor topic) and reports every change.
//! - [`ScaleOut`]: runs one process's share of a job that runs on several: the tasks the group
//!   assigns, each restored from and fenced on its own location under the job's.
//! - [`RepartitionThrough`]: re-keys a stream through a topic, so a stateful operator after it
//!   sees every record of a key in one task.
//! - [`KafkaSink`]: each batch in one Kafka transaction that also records the batch id, so a
//!   replayed batch is never written twice.
//!
//! The protocol and what is tested against which broker: `docs/kafka.md`.

mod decode;
mod membership;
mod plan;
mod repartition;
mod scale_out;
mod sink;
mod source;

pub use decode::{DeadLetter, Decode};
pub use membership::{Membership, MembershipConfig, Task, TaskChange};
pub use repartition::{Repartition, RepartitionThrough};
pub use scale_out::{BuildTask, ScaleOut, ScaleOutError, ScaleOutSummary};
pub use sink::{KafkaSink, OutRecord, SinkOutcome};
pub use source::{GroupCommitter, KafkaRecord, KafkaSource, KafkaSourceBuilder, StartFrom, Topics};

/// Whether a Kafka client error may heal by itself: brokers unreachable or not answering in time,
/// a partition's leader moving, a coordinator not ready, or a transactional error librdkafka
/// calls retriable. Fencing, authorization, configuration and data errors are final.
pub(crate) fn is_transient(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    if let rdkafka::error::KafkaError::Transaction(t) = e {
        if t.is_retriable() {
            return true;
        }
    }
    matches!(
        e.rdkafka_error_code(),
        Some(
            AllBrokersDown
                | BrokerTransportFailure
                | Resolve
                | MessageTimedOut
                | OperationTimedOut
                | TimedOutQueue
                | LeaderNotAvailable
                | NotLeaderForPartition
                | RequestTimedOut
                | BrokerNotAvailable
                | NetworkException
                | CoordinatorNotAvailable
                | NotCoordinator
                | NotEnoughReplicas
                | KafkaStorageError
        )
    )
}

/// `e` with what was being done, marked [`cairn::Transient`] when it may heal.
pub(crate) fn failure(doing: impl std::fmt::Display, e: rdkafka::error::KafkaError) -> cairn::UserError {
    let transient = is_transient(&e);
    let message = format!("{doing}: {e}");
    if transient {
        cairn::Transient::wrap(message)
    } else {
        message.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn broker_outages_are_transient_and_fencing_is_not() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            let e = failure("reading", KafkaError::MessageConsumption(code));
            assert!(cairn::is_transient(e.as_ref()), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::OffsetOutOfRange,
        ] {
            let e = failure("writing", KafkaError::MessageProduction(code));
            assert!(!cairn::is_transient(e.as_ref()), "{code:?}");
            assert!(e.to_string().starts_with("writing: "), "{e}");
        }
    }
}
