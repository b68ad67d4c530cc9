//! rayvisor VMM.
