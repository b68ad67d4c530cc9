//! rayvisor API types and OpenAPI documents.
//!
//! Every body that crosses an API boundary is defined here once, as a serde type with an
//! OpenAPI schema, so the server, the CLI and the published document cannot drift apart.
//! Request bodies reject unknown fields: a typo in a field name is an error, not a default.
pub mod agent;
pub mod decode;
pub mod encode;
pub mod gpu;
pub mod net;
pub mod vmm;
pub mod vsock;
