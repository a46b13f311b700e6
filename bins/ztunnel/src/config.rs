//! ztunnel's configuration: Istio ztunnel's environment variables (the same names, so a Deployment written
//! for theirs works with ours), each also a flag, parsed and checked here and nowhere else (DESIGN.md
//! principle 4). An invalid value stops the process with a message that names the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_core::{SpiffeId, TrustDomain};

/// meshkit ztunnel: the ambient-mode node proxy (L4; HBONE on port 15008). Every option is also read from
/// the environment variable in its name, as Istio's ztunnel reads it.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub(crate) struct Args {
    /// Istio's chart starts its ztunnel as `ztunnel proxy ztunnel`; those words are accepted and ignored.
    #[arg(hide = true, num_args = 0..)]
    pub command: Vec<String>,
    /// The xDS server (istiod) as `https://host:port`; an empty value disables xDS (then LOCAL_XDS_PATH or
    /// LOCAL_XDS must give the configuration). Default, as Istio's ztunnel, when no local configuration is
    /// given: `https://istiod.istio-system.svc:15012` in a Kubernetes pod (KUBERNETES_SERVICE_HOST set),
    /// else `https://localhost:15012`.
    #[arg(long, env = "XDS_ADDRESS", value_name = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// Set by Kubernetes in every pod; only its presence is read (it picks the default istiod address).
    #[arg(
        long,
        env = "KUBERNETES_SERVICE_HOST",
        value_name = "KUBERNETES_SERVICE_HOST",
        hide = true
    )]
    pub kubernetes_service_host: Option<String>,
    /// The Istio CA as `https://host:port` (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS", value_name = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Root certificate(s) that sign istiod's serving certificate: a PEM file path or PEM text.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        value_name = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: String,
    /// Root certificate(s) for the CA's serving certificate (default: XDS_ROOT_CA).
    #[arg(long, env = "CA_ROOT_CA", value_name = "CA_ROOT_CA")]
    pub ca_root_ca: Option<String>,
    /// TLS name to verify istiod's certificate against instead of the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME", value_name = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// TLS name to verify the CA's certificate against instead of the address's host.
    #[arg(long, env = "ALT_CA_HOSTNAME", value_name = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,
    /// The bearer token for xDS and the CA: a file path (re-read on every use, as tokens rotate) or the
    /// token itself.
    #[arg(
        long,
        env = "AUTH_TOKEN",
        value_name = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: String,
    /// Static configuration file (Istio ztunnel's LOCAL_XDS_PATH format), reloaded when it changes.
    #[arg(long, env = "LOCAL_XDS_PATH", value_name = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,
    /// Static configuration given inline, in the same format.
    #[arg(long, env = "LOCAL_XDS", value_name = "LOCAL_XDS")]
    pub local_xds: Option<String>,
    /// A SPIFFE Workload API socket (`unix:///path`) to take certificates from instead of the Istio CA.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", value_name = "SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint_socket: Option<String>,
    /// Cluster id, sent to istiod and used in workload uids (Istio's chart may set ISTIO_META_CLUSTER_ID
    /// instead, which is used when CLUSTER_ID is not set; default `Kubernetes`).
    #[arg(long = "cluster-id", env = "CLUSTER_ID", value_name = "CLUSTER_ID")]
    pub cluster_id_arg: Option<String>,
    /// Fallback for CLUSTER_ID.
    #[arg(
        long,
        env = "ISTIO_META_CLUSTER_ID",
        value_name = "ISTIO_META_CLUSTER_ID",
        hide = true
    )]
    pub istio_meta_cluster_id: Option<String>,
    /// The cluster id in effect (CLUSTER_ID, else ISTIO_META_CLUSTER_ID, else `Kubernetes`).
    #[arg(skip)]
    pub cluster_id: String,
    /// The network of this node's workloads (Istio's NETWORK; empty: the default network).
    #[arg(long, env = "NETWORK", value_name = "NETWORK", default_value = "")]
    pub network: String,
    /// Certificates from PEM files instead of a CA: a directory holding `cert-chain.pem`, `key.pem` and
    /// `root-cert.pem` (reloaded when they change). Dedicated mode only: one workload, one certificate.
    #[arg(long, env = "CERT_DIR", value_name = "CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Development only: sign workload certificates in-process with the root in this directory
    /// (`root-cert.pem` and `ca-key.pem`, as `meshctl dev-ca init` writes them), like Istio's FAKE_CA.
    #[arg(long, env = "DEV_CA_DIR", value_name = "DEV_CA_DIR")]
    pub dev_ca_dir: Option<PathBuf>,
    /// Trust domain of the workloads this proxy serves.
    #[arg(
        long,
        env = "TRUST_DOMAIN",
        value_name = "TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
    /// The Kubernetes node this proxy serves.
    #[arg(long, env = "NODE_NAME", value_name = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// ztunnel's own pod name.
    #[arg(long, env = "POD_NAME", value_name = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// ztunnel's own namespace.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "POD_NAMESPACE",
        default_value = "istio-system"
    )]
    pub pod_namespace: String,
    /// ztunnel's own service account.
    #[arg(
        long,
        env = "SERVICE_ACCOUNT",
        value_name = "SERVICE_ACCOUNT",
        default_value = "ztunnel"
    )]
    pub service_account: String,
    /// ztunnel's own pod IP, sent to istiod.
    #[arg(long, env = "INSTANCE_IP", value_name = "INSTANCE_IP")]
    pub instance_ip: Option<IpAddr>,
    /// `shared`: one proxy for the node's workloads; `dedicated`: one workload (PROXY_WORKLOAD_INFO),
    /// capturing in the proxy's own network namespace.
    #[arg(long, env = "PROXY_MODE", value_name = "PROXY_MODE", default_value = "shared")]
    pub proxy_mode: String,
    /// In dedicated mode, the workload served, as `namespace/name/serviceAccount`.
    #[arg(long, env = "PROXY_WORKLOAD_INFO", value_name = "PROXY_WORKLOAD_INFO")]
    pub proxy_workload_info: Option<String>,
    /// Lifetime asked for workload certificates (renewed at half life).
    #[arg(long, env = "SECRET_TTL", value_name = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub secret_ttl: Duration,
    /// Serve SOCKS5 on 127.0.0.1:15080 (dedicated mode, and shared mode without istio-cni; in-pod mode
    /// serves none and says so).
    #[arg(long, env = "UNSTABLE_ENABLE_SOCKS5", value_name = "UNSTABLE_ENABLE_SOCKS5", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_socks5: bool,
    /// Listen on `[::]` rather than `0.0.0.0`.
    #[arg(long, env = "IPV6_ENABLED", value_name = "IPV6_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6_enabled: bool,
    /// How long connections may finish after SIGTERM before they are closed (e.g. `10s`). Takes precedence
    /// over TERMINATION_GRACE_PERIOD_SECONDS; default 5 s.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_name = "CONNECTION_TERMINATION_DEADLINE", value_parser = parse_duration)]
    pub connection_termination_deadline: Option<Duration>,
    /// The pod's `terminationGracePeriodSeconds` (whole seconds), as Istio's chart passes it: the drain ends
    /// 5 s before it (1 s when it is 10 s or less, and lasts at least 1 s), so the proxy closes what is left
    /// itself before Kubernetes kills it.
    #[arg(
        long,
        env = "TERMINATION_GRACE_PERIOD_SECONDS",
        value_name = "TERMINATION_GRACE_PERIOD_SECONDS"
    )]
    pub termination_grace_period_seconds: Option<u64>,
    /// Most streams per pooled HBONE connection before another is opened.
    #[arg(
        long,
        env = "POOL_MAX_STREAMS_PER_CONNECTION",
        value_name = "POOL_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub pool_max_streams: u32,
    /// Idle pooled HBONE connections close after this.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", value_name = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// In shared mode, take pods from istio-cni over the ZDS socket (INPOD_UDS) and serve each inside its
    /// own network namespace: Istio's in-pod mode, on by default as in Istio. `false`: serve the node's
    /// workloads from the node's own namespace, finding them by address (for setups without istio-cni,
    /// with capture rules on the node). Dedicated mode ignores it.
    #[arg(long, env = "INPOD_ENABLED", value_name = "INPOD_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub inpod_enabled: bool,
    /// The ZDS socket istio-cni listens on.
    #[arg(
        long,
        env = "INPOD_UDS",
        value_name = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub inpod_uds: PathBuf,
    /// In-pod mode: connect to a pod's application from the client's own IP (the HBONE peer's, or the
    /// plaintext client's), so the application sees who called it; the pod's capture rules route the
    /// replies back. Unset: on wherever the pod's inbound listeners can be made transparent (needs
    /// CAP_NET_ADMIN); `true`: required, and a pod where that fails is not served; `false`: off, the
    /// application sees the pod's own IP. Shared mode without istio-cni (INPOD_ENABLED=false): unless
    /// `false`, the connections the node proxy opens for a workload (HBONE and plain TCP) leave from that
    /// workload's own IP, so the destination's IP-based policy (`ipBlocks`) and telemetry see the real
    /// client; a workload address that is not the node's own needs CAP_NET_ADMIN and the replies routed
    /// back to the node's stack (TPROXY-style rules), and a connection that cannot be bound fails rather
    /// than leave from the node's address. Dedicated mode does not use it.
    #[arg(long = "enable-orig-src", env = "ENABLE_ORIG_SRC", value_name = "ENABLE_ORIG_SRC", action = clap::ArgAction::Set)]
    pub enable_original_source: Option<bool>,
    /// Worker threads of the data path runtime: a count (`4`) or a share of the cores (`50%`, rounded up,
    /// at least one). Default: max(2, a quarter of the cores).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", value_name = "ZTUNNEL_WORKER_THREADS")]
    pub worker_threads: Option<String>,
    /// The cores the proxy may use, as Istio's chart passes its CPU limit (downward API, rounded up to whole
    /// cores). Default: the cores this process can run on.
    #[arg(long, env = "ZTUNNEL_CPU_LIMIT", value_name = "ZTUNNEL_CPU_LIMIT")]
    pub cpu_limit: Option<usize>,
    /// Log line format: `plain` (text) or `json` (one object per line, the event's fields at the top level,
    /// as Istio's ztunnel writes with LOG_FORMAT=json).
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// How log lines are written (LOG_FORMAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable text lines.
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How the proxy serves workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProxyMode {
    /// One proxy for every workload on `NODE_NAME`, found by source address.
    Shared,
    /// One workload, in the proxy's own network namespace.
    Dedicated {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its service account.
        service_account: String,
    },
}

/// Where workloads, services and policies come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConfigSource {
    /// Delta ADS from istiod (or `meshctl control-plane`).
    Xds {
        /// `https://host:port`.
        address: String,
    },
    /// A watched file.
    File(PathBuf),
    /// Inline YAML.
    Inline(String),
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertSource {
    /// The Istio CA over gRPC.
    IstioCa {
        /// `https://host:port`.
        address: String,
    },
    /// A SPIFFE Workload API socket.
    Spiffe {
        /// `unix:///path`.
        endpoint: String,
    },
    /// PEM files in a directory.
    Files(PathBuf),
    /// An in-process development CA.
    DevCa(PathBuf),
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub args: Args,
    pub mode: ProxyMode,
    pub source: ConfigSource,
    pub certs: CertSource,
    pub trust_domain: TrustDomain,
    pub own_identity: SpiffeId,
    /// Worker threads of the data-path runtime, from ZTUNNEL_WORKER_THREADS and ZTUNNEL_CPU_LIMIT.
    pub workers: usize,
    /// How long open connections may finish after SIGTERM, from CONNECTION_TERMINATION_DEADLINE or
    /// TERMINATION_GRACE_PERIOD_SECONDS.
    pub drain_deadline: Duration,
}

/// Why the configuration was refused; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub(crate) struct ConfigError {
    variable: &'static str,
    reason: String,
}

fn invalid(variable: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        reason: reason.into(),
    }
}

impl Config {
    /// Checks the arguments as a whole.
    pub(crate) fn from_args(mut args: Args) -> Result<Config, ConfigError> {
        match args
            .command
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [] | ["proxy"] | ["proxy", "ztunnel"] => {}
            other => {
                return Err(invalid(
                    "ARGS",
                    format!("unexpected arguments {other:?} (only `proxy ztunnel`, as Istio's chart passes)"),
                ));
            }
        }
        args.cluster_id = args
            .cluster_id_arg
            .clone()
            .or_else(|| args.istio_meta_cluster_id.clone())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| "Kubernetes".to_owned());
        let trust_domain =
            TrustDomain::new(&args.trust_domain).map_err(|e| invalid("TRUST_DOMAIN", e.to_string()))?;
        let own_identity = SpiffeId::istio(&trust_domain, &args.pod_namespace, &args.service_account)
            .map_err(|e| invalid("SERVICE_ACCOUNT", format!("ztunnel's own identity: {e}")))?;
        let mode = match args.proxy_mode.as_str() {
            "shared" => {
                if args.node_name.is_empty() {
                    return Err(invalid(
                        "NODE_NAME",
                        "shared mode serves the workloads of a node: set NODE_NAME",
                    ));
                }
                ProxyMode::Shared
            }
            "dedicated" => {
                let info = args.proxy_workload_info.as_deref().ok_or_else(|| {
                    invalid(
                        "PROXY_WORKLOAD_INFO",
                        "dedicated mode needs namespace/name/serviceAccount",
                    )
                })?;
                let parts: Vec<&str> = info.split('/').collect();
                let [namespace, name, service_account] = parts.as_slice() else {
                    return Err(invalid(
                        "PROXY_WORKLOAD_INFO",
                        format!("{info:?} is not namespace/name/serviceAccount"),
                    ));
                };
                if [namespace, name, service_account]
                    .iter()
                    .any(|part| part.is_empty())
                {
                    return Err(invalid(
                        "PROXY_WORKLOAD_INFO",
                        format!("{info:?} has an empty part"),
                    ));
                }
                SpiffeId::istio(&trust_domain, namespace, service_account)
                    .map_err(|e| invalid("PROXY_WORKLOAD_INFO", e.to_string()))?;
                ProxyMode::Dedicated {
                    namespace: (*namespace).to_owned(),
                    name: (*name).to_owned(),
                    service_account: (*service_account).to_owned(),
                }
            }
            other => {
                return Err(invalid(
                    "PROXY_MODE",
                    format!("{other:?} is neither \"shared\" nor \"dedicated\""),
                ));
            }
        };
        let xds = match &args.xds_address {
            Some(address) => Some(address.clone()).filter(|address| !address.trim().is_empty()),
            None if args.local_xds_path.is_none() && args.local_xds.is_none() => {
                let in_cluster = args
                    .kubernetes_service_host
                    .as_deref()
                    .is_some_and(|host| !host.is_empty());
                Some(default_istiod(in_cluster).to_owned())
            }
            None => None,
        };
        let source = match (&xds, &args.local_xds_path, &args.local_xds) {
            (_, Some(_), Some(_)) => {
                return Err(invalid(
                    "LOCAL_XDS_PATH",
                    "LOCAL_XDS_PATH and LOCAL_XDS are mutually exclusive",
                ));
            }
            (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {
                return Err(invalid(
                    "XDS_ADDRESS",
                    "set either XDS_ADDRESS or a local configuration (LOCAL_XDS_PATH / LOCAL_XDS), not both",
                ));
            }
            (Some(address), None, None) => ConfigSource::Xds {
                address: check_url("XDS_ADDRESS", address)?,
            },
            (None, Some(path), None) => ConfigSource::File(path.clone()),
            (None, None, Some(inline)) => ConfigSource::Inline(inline.clone()),
            (None, None, None) => {
                return Err(invalid(
                    "XDS_ADDRESS",
                    "no configuration source: set XDS_ADDRESS, LOCAL_XDS_PATH or LOCAL_XDS",
                ));
            }
        };
        let chosen = [
            args.spiffe_endpoint_socket.is_some(),
            args.cert_dir.is_some(),
            args.dev_ca_dir.is_some(),
        ];
        if chosen.iter().filter(|set| **set).count() > 1 {
            return Err(invalid(
                "CERT_DIR",
                "choose one certificate source: SPIFFE_ENDPOINT_SOCKET, CERT_DIR or DEV_CA_DIR (or a CA)",
            ));
        }
        if args.cert_dir.is_some() && args.proxy_mode != "dedicated" {
            return Err(invalid(
                "CERT_DIR",
                "certificates from files serve one workload: use PROXY_MODE=dedicated",
            ));
        }
        let certs = match (&args.spiffe_endpoint_socket, &args.ca_address, &xds) {
            _ if args.cert_dir.is_some() => CertSource::Files(args.cert_dir.clone().unwrap_or_default()),
            _ if args.dev_ca_dir.is_some() => CertSource::DevCa(args.dev_ca_dir.clone().unwrap_or_default()),
            (Some(endpoint), _, _) => CertSource::Spiffe {
                endpoint: endpoint.clone(),
            },
            (None, Some(address), _) => CertSource::IstioCa {
                address: check_url("CA_ADDRESS", address)?,
            },
            (None, None, Some(address)) => CertSource::IstioCa {
                address: check_url("XDS_ADDRESS", address)?,
            },
            (None, None, None) => {
                return Err(invalid(
                    "CA_ADDRESS",
                    "no certificate source: set CA_ADDRESS (or XDS_ADDRESS) or SPIFFE_ENDPOINT_SOCKET",
                ));
            }
        };
        let cores = match args.cpu_limit {
            Some(0) => return Err(invalid("ZTUNNEL_CPU_LIMIT", "must be at least 1")),
            Some(limit) => limit,
            None => std::thread::available_parallelism().map_or(2, usize::from),
        };
        let workers = worker_threads(args.worker_threads.as_deref(), cores)?;
        let drain_deadline = drain_deadline(
            args.connection_termination_deadline,
            args.termination_grace_period_seconds,
        );
        if args.pool_max_streams == 0 {
            return Err(invalid("POOL_MAX_STREAMS_PER_CONNECTION", "must be at least 1"));
        }
        Ok(Config {
            args,
            mode,
            source,
            certs,
            trust_domain,
            own_identity,
            workers,
            drain_deadline,
        })
    }
}

/// Istio ztunnel's istiod address when XDS_ADDRESS is not set: the in-cluster service, or a local one.
fn default_istiod(in_cluster: bool) -> &'static str {
    if in_cluster {
        "https://istiod.istio-system.svc:15012"
    } else {
        "https://localhost:15012"
    }
}

/// The drain deadline as Istio's ztunnel derives it: CONNECTION_TERMINATION_DEADLINE as given; else from
/// the pod's grace period, leaving time to close what is left before Kubernetes' SIGKILL (5 s of a grace
/// period over 10 s, else 1 s; at least 1 s); else 5 s.
fn drain_deadline(explicit: Option<Duration>, grace_period_seconds: Option<u64>) -> Duration {
    match (explicit, grace_period_seconds) {
        (Some(deadline), _) => deadline,
        (None, Some(grace)) => {
            let margin = if grace > 10 { 5 } else { 1 };
            Duration::from_secs(grace.saturating_sub(margin).max(1))
        }
        (None, None) => Duration::from_secs(5),
    }
}

/// The data-path runtime's size for ZTUNNEL_WORKER_THREADS on `cores` cores: a count, a percentage of the
/// cores (rounded up, at least one), or by default a quarter of the cores and at least two (the data
/// path's tasks hand work between threads; one thread would serialise a node's connections behind
/// whichever is busy).
fn worker_threads(setting: Option<&str>, cores: usize) -> Result<usize, ConfigError> {
    const VARIABLE: &str = "ZTUNNEL_WORKER_THREADS";
    let Some(setting) = setting.map(str::trim) else {
        return Ok(cores.div_ceil(4).max(2));
    };
    let workers = match setting.strip_suffix('%') {
        Some(percent) => {
            let percent: f64 = percent
                .trim()
                .parse()
                .map_err(|_| invalid(VARIABLE, format!("{setting:?} is not a percentage like 50%")))?;
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(invalid(
                    VARIABLE,
                    format!("{setting:?}: a share above 0% and up to 100%"),
                ));
            }
            // Rounded up, as Istio's ztunnel does: the fewest threads that make up the share.
            let as_f64 = |n: usize| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
            let wanted = as_f64(cores) * percent / 100.0;
            (1..=cores).find(|n| as_f64(*n) >= wanted).unwrap_or(cores).max(1)
        }
        None => setting.parse::<usize>().map_err(|_| {
            invalid(
                VARIABLE,
                format!("{setting:?} is neither a count nor a percentage"),
            )
        })?,
    };
    // Beyond a few hundred threads something is misconfigured (each costs a stack and a scheduler slot).
    match workers {
        0 => Err(invalid(VARIABLE, "must be at least 1")),
        1..=1024 => Ok(workers),
        _ => Err(invalid(VARIABLE, format!("{workers} threads: at most 1024"))),
    }
}

fn check_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    // Istio's chart sets `istiod.istio-system.svc:15012` without a scheme; Istio's ztunnel means https.
    let value = if value.contains("://") {
        value.to_owned()
    } else {
        format!("https://{value}")
    };
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(
                variable,
                format!("{value:?} must be https://host:port (or http://)"),
            )
        })?;
    if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
        return Err(invalid(variable, format!("{value:?} must be scheme://host:port")));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

/// Parses Go-style durations as Istio's settings use them: `500ms`, `10s`, `5m`, `24h`, or plain seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 10s, 5m, 24h)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        // Tests pass flags only; the environment of the test process is not read for these names
        // because each flag given on the command line wins over its variable.
        let mut argv = vec!["ztunnel"];
        for (flag, value) in [
            ("--node-name", "node-a"),
            ("--xds-address", "https://istiod:15012"),
        ] {
            if !extra.contains(&flag) {
                argv.extend([flag, value]);
            }
        }
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn defaults_are_istios() {
        let config = Config::from_args(args(&[]).unwrap()).unwrap();
        assert_eq!(config.mode, ProxyMode::Shared);
        assert_eq!(
            config.source,
            ConfigSource::Xds {
                address: "https://istiod:15012".into()
            }
        );
        assert_eq!(
            config.certs,
            CertSource::IstioCa {
                address: "https://istiod:15012".into()
            }
        );
        assert_eq!(
            config.own_identity.as_str(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(config.args.secret_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(config.args.pool_idle_timeout, Duration::from_secs(300));
        assert_eq!(config.args.pool_max_streams, 100);
        assert!(
            config.args.inpod_enabled,
            "shared mode is in-pod mode unless told otherwise"
        );
        assert_eq!(
            config.args.enable_original_source, None,
            "original source is decided by what the pod's listeners allow"
        );
    }

    #[test_case(&[] => Duration::from_secs(5) ; "default")]
    #[test_case(&["--termination-grace-period-seconds", "30"] => Duration::from_secs(25) ; "istio chart's 30 s")]
    #[test_case(&["--termination-grace-period-seconds", "10"] => Duration::from_secs(9) ; "short grace keeps 1 s")]
    #[test_case(&["--termination-grace-period-seconds", "1"] => Duration::from_secs(1) ; "at least a second")]
    #[test_case(&["--termination-grace-period-seconds", "30", "--connection-termination-deadline", "2s"] => Duration::from_secs(2) ; "explicit deadline first")]
    fn drain_deadline_follows_istio(extra: &[&str]) -> Duration {
        Config::from_args(args(extra).unwrap()).unwrap().drain_deadline
    }

    #[test_case(&["--cpu-limit", "16"] => 4 ; "a quarter of the limit")]
    #[test_case(&["--cpu-limit", "4"] => 2 ; "at least two by default")]
    #[test_case(&["--cpu-limit", "9"] => 3 ; "a quarter rounded up")]
    #[test_case(&["--cpu-limit", "8", "--worker-threads", "50%"] => 4 ; "a share of the limit")]
    #[test_case(&["--cpu-limit", "3", "--worker-threads", "10%"] => 1 ; "a small share is one thread")]
    #[test_case(&["--cpu-limit", "3", "--worker-threads", "34%"] => 2 ; "a share rounded up")]
    #[test_case(&["--cpu-limit", "2", "--worker-threads", "6"] => 6 ; "a count is taken as it is")]
    #[test_case(&["--cpu-limit", "8", "--worker-threads", "12.5%"] => 1 ; "a fractional share")]
    #[test_case(&["--cpu-limit", "8", "--worker-threads", "12.6%"] => 2 ; "a fractional share rounded up")]
    fn workers_follow_istios_settings(extra: &[&str]) -> usize {
        Config::from_args(args(extra).unwrap()).unwrap().workers
    }

    #[test]
    fn grace_period_is_whole_seconds_as_kubernetes_gives_it() {
        let error = args(&["--termination-grace-period-seconds", "2s"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("TERMINATION_GRACE_PERIOD_SECONDS"), "{error}");
        let error = args(&["--connection-termination-deadline", "soon"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("CONNECTION_TERMINATION_DEADLINE"), "{error}");
    }

    #[test]
    fn log_format_is_plain_or_json() {
        let plain = Config::from_args(args(&[]).unwrap()).unwrap();
        assert_eq!(plain.args.log_format, LogFormat::Plain);
        let json = Config::from_args(args(&["--log-format", "json"]).unwrap()).unwrap();
        assert_eq!(json.args.log_format, LogFormat::Json);
        let error = args(&["--log-format", "yaml"]).unwrap_err().to_string();
        assert!(error.contains("LOG_FORMAT"), "{error}");
    }

    #[test_case(&[] => None ; "unset")]
    #[test_case(&["--enable-orig-src", "true"] => Some(true) ; "required")]
    #[test_case(&["--enable-orig-src", "false"] => Some(false) ; "off")]
    fn original_source_is_istios_three_way_setting(extra: &[&str]) -> Option<bool> {
        Config::from_args(args(extra).unwrap())
            .unwrap()
            .args
            .enable_original_source
    }

    #[test]
    fn original_source_is_documented_and_checked_under_istios_name() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("ENABLE_ORIG_SRC"), "{help}");
        let error = args(&["--enable-orig-src", "sometimes"]).unwrap_err().to_string();
        assert!(error.contains("ENABLE_ORIG_SRC"), "{error}");
    }

    #[test]
    fn dedicated_mode_reads_the_workload() {
        let config = Config::from_args(
            args(&[
                "--proxy-mode",
                "dedicated",
                "--proxy-workload-info",
                "default/client-0/client",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            config.mode,
            ProxyMode::Dedicated {
                namespace: "default".into(),
                name: "client-0".into(),
                service_account: "client".into()
            }
        );
    }

    #[test_case(&["--proxy-mode", "sidecar"], "PROXY_MODE" ; "unknown mode")]
    #[test_case(&["--proxy-mode", "dedicated"], "PROXY_WORKLOAD_INFO" ; "dedicated without workload")]
    #[test_case(&["--proxy-mode", "dedicated", "--proxy-workload-info", "a/b"], "PROXY_WORKLOAD_INFO" ; "two parts")]
    #[test_case(&["--proxy-mode", "dedicated", "--proxy-workload-info", "a//c"], "PROXY_WORKLOAD_INFO" ; "empty part")]
    #[test_case(&["--trust-domain", "Bad Domain"], "TRUST_DOMAIN" ; "bad trust domain")]
    #[test_case(&["--xds-address", "https://"], "XDS_ADDRESS" ; "address without host")]
    #[test_case(&["--cert-dir", "/c"], "CERT_DIR" ; "file certificates in shared mode")]
    #[test_case(&["--cert-dir", "/c", "--dev-ca-dir", "/d"], "CERT_DIR" ; "two certificate sources")]
    #[test_case(&["serve"], "ARGS" ; "unknown command word")]
    #[test_case(&["--ca-address", "ftp://ca"], "CA_ADDRESS" ; "ca address with another scheme")]
    #[test_case(&["--local-xds-path", "/x", "--local-xds", "y"], "LOCAL_XDS_PATH" ; "two local sources")]
    #[test_case(&["--local-xds-path", "/x", "--xds-address", "https://istiod:15012"], "XDS_ADDRESS" ; "xds and a local source")]
    #[test_case(&["--node-name", ""], "NODE_NAME" ; "shared mode without node")]
    #[test_case(&["--pool-max-streams", "0"], "POOL_MAX_STREAMS_PER_CONNECTION" ; "zero streams")]
    #[test_case(&["--worker-threads", "0"], "ZTUNNEL_WORKER_THREADS" ; "zero workers")]
    #[test_case(&["--worker-threads", "0%"], "ZTUNNEL_WORKER_THREADS" ; "zero percent")]
    #[test_case(&["--worker-threads", "101%"], "ZTUNNEL_WORKER_THREADS" ; "over a hundred percent")]
    #[test_case(&["--worker-threads", "half"], "ZTUNNEL_WORKER_THREADS" ; "not a number")]
    #[test_case(&["--worker-threads", "NaN%"], "ZTUNNEL_WORKER_THREADS" ; "not a number percent")]
    #[test_case(&["--worker-threads", "5000"], "ZTUNNEL_WORKER_THREADS" ; "absurd count")]
    #[test_case(&["--cpu-limit", "0"], "ZTUNNEL_CPU_LIMIT" ; "zero cores")]
    fn refusals_name_the_variable(extra: &[&str], variable: &str) {
        let error = Config::from_args(args(extra).unwrap()).unwrap_err();
        assert!(error.to_string().starts_with(&format!("{variable}: ")), "{error}");
    }

    #[test]
    fn istio_chart_spellings_are_understood() {
        let config = Config::from_args(
            args(&[
                "proxy",
                "ztunnel",
                "--xds-address",
                "istiod.istio-system.svc:15012",
                "--istio-meta-cluster-id",
                "east",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            config.source,
            ConfigSource::Xds {
                address: "https://istiod.istio-system.svc:15012".into()
            }
        );
        assert_eq!(config.args.cluster_id, "east");
        let explicit =
            Config::from_args(args(&["--cluster-id", "west", "--istio-meta-cluster-id", "east"]).unwrap())
                .unwrap();
        assert_eq!(explicit.args.cluster_id, "west");
    }

    #[test_case("10.96.0.1" => "https://istiod.istio-system.svc:15012" ; "in a kubernetes pod")]
    #[test_case("" => "https://localhost:15012" ; "elsewhere")]
    fn xds_defaults_to_istiod_as_istio(kubernetes_service_host: &str) -> String {
        let args = Args::try_parse_from([
            "ztunnel",
            "--node-name",
            "node-a",
            "--kubernetes-service-host",
            kubernetes_service_host,
        ])
        .unwrap();
        let config = Config::from_args(args).unwrap();
        // The CA defaults to the same address.
        assert_eq!(
            config.certs,
            CertSource::IstioCa {
                address: match &config.source {
                    ConfigSource::Xds { address } => address.clone(),
                    other => panic!("{other:?}"),
                }
            }
        );
        match config.source {
            ConfigSource::Xds { address } => address,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_xds_address_disables_xds() {
        let config = Config::from_args(
            args(&[
                "--xds-address",
                "",
                "--local-xds-path",
                "/etc/mesh.yaml",
                "--ca-address",
                "https://ca:15012",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(config.source, ConfigSource::File("/etc/mesh.yaml".into()));
        assert_eq!(
            config.certs,
            CertSource::IstioCa {
                address: "https://ca:15012".into()
            }
        );
    }

    #[test_case("500ms" => Ok(Duration::from_millis(500)))]
    #[test_case("10s" => Ok(Duration::from_secs(10)))]
    #[test_case("5m" => Ok(Duration::from_secs(300)))]
    #[test_case("24h" => Ok(Duration::from_secs(86_400)))]
    #[test_case("7" => Ok(Duration::from_secs(7)))]
    fn durations(text: &str) -> Result<Duration, String> {
        parse_duration(text)
    }

    #[test]
    fn bad_durations_and_flags_are_refused_by_clap_naming_the_variable() {
        assert!(parse_duration("10 parsecs").is_err());
        let error = args(&["--secret-ttl", "forever"]).unwrap_err().to_string();
        assert!(error.contains("SECRET_TTL"), "{error}");
    }
}
