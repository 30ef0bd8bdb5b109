// Package client is the source-host side: a userspace NBD client, kernel
// attach through go-nbd, mirror setup with mdadm or LVM, freeze+snapshot and
// push. (Issues #3 and #6.)
package client
