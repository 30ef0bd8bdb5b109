// Package integration holds end-to-end tests against real MinIO and real
// third-party NBD clients. Its subpackages are test rigs: miniotest runs a
// MinIO server.
package integration
