//! Guest boot: memory layout, kernel loading, boot parameters and firmware tables.
