// Package volume is the volume engine: write log, index, uploader,
// snapshots and recovery over a chunkstore.Store. It knows nothing about NBD
// and must never import nbdserver/nbd (make lint checks). (Issue #4.)
package volume
