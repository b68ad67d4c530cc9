//! rayvisor placement engine.
