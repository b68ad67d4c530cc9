//! rayvisor API types.
