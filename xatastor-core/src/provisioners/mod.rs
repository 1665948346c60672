//! [`VolumeProvisioner`](crate::VolumeProvisioner) implementations that need nothing but this crate:
//! memory (volatile, for tests and scale runs) and files in a data directory.
