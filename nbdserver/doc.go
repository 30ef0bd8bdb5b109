// Package nbdserver is the backup server: the export registry (names to
// volumes and snapshots), listeners, TLS, lifecycle, the admin HTTP API and
// metrics. It wires nbdserver/nbd to nbdserver/volume. (Issue #5.)
package nbdserver
