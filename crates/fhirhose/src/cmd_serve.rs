//! `fhirhose serve`.

use tracing_subscriber::EnvFilter;

use crate::failure::{EXIT_DATABASE_UNAVAILABLE, EXIT_FAILURE, Failure};

pub fn run(config: server::ServeConfig) -> Result<(), Failure> {
    let filter = EnvFilter::try_from_env("FHIRHOSE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    match config.log_format {
        server::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        server::LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let rt =
        tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(server::serve(config)).map_err(|e| {
        let code = match &e {
            server::ServeError::Store {
                source: store::StoreError::Unavailable { .. },
                ..
            } => EXIT_DATABASE_UNAVAILABLE,
            _ => EXIT_FAILURE,
        };
        Failure {
            message: e.to_string(),
            code,
        }
    })
}
