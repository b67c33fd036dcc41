//! The request handlers, one module per route family. Each takes what it needs of the request and
//! answers with a response or a typed refusal ([`crate::http::errors::ApiError`]; for `GET /sse`,
//! the domain result [`sse::Opened`] / [`sse::Refused`]): none builds an error response itself.
//!
//! - [`admission`]: the checks before acting (token, origin, rates, stream caps), and their counts;
//! - [`sse`]: opening an event stream;
//! - [`publish`]: `POST /publish`, with the validation of its body in `publish::plan`;
//! - [`connections`]: the cluster-wide connection listing;
//! - [`probes`]: `/health`, `/ready`, `/metrics` and the redirect of `/`.

pub mod admission;
pub mod connections;
pub mod probes;
pub mod publish;
pub mod sse;
