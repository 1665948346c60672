//! Handing a running node's connections to a new process: the running node passes its listening
//! sockets and every established connection, each with the state its engine needs, over a Unix
//! socket to a freshly started binary, which carries on serving them without the hosts noticing.

pub(crate) mod wire;
