//! Authentication of CONNECTs (issue 18, under way): password hashes as the files and
//! collections fleets already have store them.

pub mod password;
