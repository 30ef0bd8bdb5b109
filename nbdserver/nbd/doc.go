// Package nbd implements the server side of the NBD wire protocol:
// fixed-newstyle negotiation, transmission with structured replies and meta
// contexts. It knows nothing about volumes and must never import
// nbdserver/volume (make lint checks). (Issue #3.)
package nbd
