//! ORCA, gRPC's Open Request Cost Aggregation (gRFC A51): the load report a
//! server attaches to each response and streams out of band, in gRPC's own
//! wire format, so that grpc-go's and grpc-java's clients read this crate's
//! servers and the other way round.
//!
//! * [`OrcaLoadReport`] is `xds.data.orca.v3.OrcaLoadReport`
//!   (`xds/data/orca/v3/orca_load_report.proto`), field for field.
//! * Per call it travels in the trailer [`LOAD_HEADER`]
//!   (`endpoint-load-metrics-bin`, the serialized report, base64 as every
//!   `-bin` header).
//! * Out of band, `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`
//!   ([`OOB_PATH`]) streams one every requested interval
//!   ([`OrcaLoadReportRequest`]); [`watch`] is its client.
//!
//! The server side is [`server::LoadLayer`](crate::server::LoadLayer),
//! which [`server::builder`](crate::server::builder) installs. The reports
//! also carry, as named metrics, the calls in flight in total
//! ([`IN_FLIGHT`]) and per method (`in_flight:/pkg.Service/Method`), which
//! `tonic-etcd drain --wait` waits on.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;

use crate::Error;

/// Base64 as gRPC writes binary metadata (no padding) and reads it (either).
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The trailer (or trailers-only header) a per-call report travels in.
pub const LOAD_HEADER: &str = "endpoint-load-metrics-bin";

/// The out-of-band method's path.
pub const OOB_PATH: &str = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics";

/// The named metric with the server's calls in flight (every method but
/// the health and ORCA services).
pub const IN_FLIGHT: &str = "in_flight";

/// The prefix of a named metric with one method's calls in flight
/// (`in_flight:/pkg.Service/Method`).
pub const IN_FLIGHT_METHOD: &str = "in_flight:";

/// `xds.data.orca.v3.OrcaLoadReport`: one server's load.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReport {
    /// CPU used by the process, as a fraction of the machine's cores.
    #[prost(double, tag = "1")]
    pub cpu_utilization: f64,
    /// Memory used, as a fraction of what is available.
    #[prost(double, tag = "2")]
    pub mem_utilization: f64,
    /// Deprecated in the proto for `rps_fractional`; left 0.
    #[prost(uint64, tag = "3")]
    pub rps: u64,
    /// Per-call costs the handler recorded (per-call reports only).
    #[prost(btree_map = "string, double", tag = "4")]
    pub request_cost: BTreeMap<String, f64>,
    /// Named utilizations, each a fraction of its resource.
    #[prost(btree_map = "string, double", tag = "5")]
    pub utilization: BTreeMap<String, f64>,
    /// Calls answered per second.
    #[prost(double, tag = "6")]
    pub rps_fractional: f64,
    /// Calls answered with an error per second.
    #[prost(double, tag = "7")]
    pub eps: f64,
    /// Application metrics (here also the calls in flight).
    #[prost(btree_map = "string, double", tag = "8")]
    pub named_metrics: BTreeMap<String, f64>,
    /// The application's own utilization, which weighted round robin
    /// prefers to `cpu_utilization` when set (gRFC A58).
    #[prost(double, tag = "9")]
    pub application_utilization: f64,
}

impl OrcaLoadReport {
    /// The calls in flight on the server when it made the report.
    pub fn in_flight(&self) -> Option<u64> {
        self.named_metrics.get(IN_FLIGHT).map(|n| n.max(0.0) as u64)
    }

    /// The calls in flight per method (the methods with one or more).
    pub fn in_flight_by_method(&self) -> BTreeMap<&str, u64> {
        self.named_metrics
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(IN_FLIGHT_METHOD)?, v.max(0.0) as u64)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Reads the report in `metadata`'s [`LOAD_HEADER`], if there is one
    /// (a response's metadata; tonic merges a unary call's trailers in).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Self> {
        let value = metadata.get_bin(LOAD_HEADER)?.to_bytes().ok()?;
        prost::Message::decode(value).ok()
    }

    /// Reads the report in HTTP headers or trailers (base64, padded or
    /// not, as every `-bin` header).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let value = headers.get(LOAD_HEADER)?;
        let bytes = BASE64.decode(value.as_bytes()).ok()?;
        prost::Message::decode(&bytes[..]).ok()
    }

    /// The report as a header value: serialized, in base64 without padding
    /// (as gRPC sends binary metadata).
    pub fn to_header(&self) -> http::HeaderValue {
        let text = BASE64.encode(prost::Message::encode_to_vec(self));
        // Base64 is always a valid header value.
        http::HeaderValue::from_str(&text).unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }
}

/// `google.protobuf.Duration`, as the request carries it.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ProtoDuration {
    /// Whole seconds.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds past them.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl From<Duration> for ProtoDuration {
    fn from(d: Duration) -> Self {
        Self {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }
}

impl ProtoDuration {
    /// As a `Duration` (negative: zero).
    pub fn to_duration(self) -> Duration {
        let secs = u64::try_from(self.seconds).unwrap_or(0);
        let nanos = u32::try_from(self.nanos).unwrap_or(0).min(999_999_999);
        Duration::new(secs, nanos)
    }
}

/// `xds.service.orca.v3.OrcaLoadReportRequest`: how often to report.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReportRequest {
    /// The interval between reports (the server may report less often).
    #[prost(message, optional, tag = "1")]
    pub report_interval: Option<ProtoDuration>,
    /// Request costs to include (none are kept out of band here).
    #[prost(string, repeated, tag = "2")]
    pub request_cost_names: Vec<String>,
}

/// Asks for the out-of-band stream over `grpc` (ready), one report every
/// `interval` or so: the one request this client, the console's probe and
/// the Balancer's weighted round robin make.
pub(crate) async fn open<T>(
    grpc: &mut tonic::client::Grpc<T>,
    interval: Duration,
) -> Result<tonic::Streaming<OrcaLoadReport>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let request = tonic::Request::new(OrcaLoadReportRequest {
        report_interval: Some(interval.into()),
        request_cost_names: Vec::new(),
    });
    let path = http::uri::PathAndQuery::from_static(OOB_PATH);
    let codec = tonic_prost::ProstCodec::<OrcaLoadReportRequest, OrcaLoadReport>::default();
    Ok(grpc
        .server_streaming(request, path, codec)
        .await?
        .into_inner())
}

/// Opens the out-of-band stream to the server at `addr` (`host:port`,
/// plain HTTP/2) and yields its reports, one every `interval` or so (the
/// server's minimum applies). Connecting is bounded by `connect_timeout`;
/// the stream then lasts until dropped or the server ends it.
pub async fn watch(
    addr: &str,
    interval: Duration,
    connect_timeout: Duration,
) -> Result<impl tokio_stream::Stream<Item = Result<OrcaLoadReport, tonic::Status>>, Error> {
    let failed = |reason: String| Error::LoadReports {
        addr: addr.to_owned(),
        reason,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| failed(format!("not an address to dial: {e}")))?
        .connect_timeout(connect_timeout);
    let channel = tokio::time::timeout(connect_timeout, endpoint.connect())
        .await
        .map_err(|_| failed(format!("no connection within {connect_timeout:?}")))?
        .map_err(|e| failed(format!("cannot connect: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| failed(format!("not ready: {e}")))?;
    open(&mut grpc, interval).await.map_err(|status| {
        failed(format!(
            "it does not serve them ({}: {})",
            status.code(),
            status.message()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The example report of the xDS ORCA design (cpu 0.1, rps 2, two named
    /// metrics), byte for byte: this type reads what gRPC writes.
    #[test]
    fn reads_the_reference_report() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode("CZqZmZmZmbk/MQAAAAAAAABAQg4KA2ZvbxGamZmZmZm5P0IOCgNiYXIRmpmZmZmZyT8=")
            .unwrap();
        let report = OrcaLoadReport::decode(&bytes[..]).unwrap();
        assert_eq!(report.cpu_utilization, 0.1);
        assert_eq!(report.rps_fractional, 2.0);
        assert_eq!(report.named_metrics.get("foo"), Some(&0.1));
        assert_eq!(report.named_metrics.get("bar"), Some(&0.2));
        // And writes what reads back the same (map entries may come in
        // another order: protobuf maps have none).
        let again = OrcaLoadReport::decode(&report.encode_to_vec()[..]).unwrap();
        assert_eq!(again, report);
        // Through a header too, and a padded one (grpc-java pads) reads.
        let header = report.to_header();
        assert!(
            !header.as_bytes().ends_with(b"="),
            "unpadded, as gRPC writes"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(LOAD_HEADER, header);
        assert_eq!(OrcaLoadReport::from_headers(&headers), Some(report.clone()));
        headers.insert(
            LOAD_HEADER,
            http::HeaderValue::from_static(
                "CZqZmZmZmbk/MQAAAAAAAABAQg4KA2ZvbxGamZmZmZm5P0IOCgNiYXIRmpmZmZmZyT8=",
            ),
        );
        assert_eq!(OrcaLoadReport::from_headers(&headers), Some(report));
    }

    #[test]
    fn in_flight_is_read_per_method() {
        let mut report = OrcaLoadReport::default();
        report.named_metrics.insert(IN_FLIGHT.into(), 3.0);
        report.named_metrics.insert("in_flight:/a.S/M".into(), 2.0);
        report.named_metrics.insert("in_flight:/a.S/N".into(), 0.0);
        report.named_metrics.insert("other".into(), 9.0);
        assert_eq!(report.in_flight(), Some(3));
        assert_eq!(
            report.in_flight_by_method().into_iter().collect::<Vec<_>>(),
            [("/a.S/M", 2)]
        );
    }

    #[test]
    fn durations_round_trip() {
        let d = Duration::from_millis(1_500);
        assert_eq!(ProtoDuration::from(d).to_duration(), d);
        let negative = ProtoDuration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(negative.to_duration(), Duration::ZERO);
    }
}
