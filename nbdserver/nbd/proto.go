// Package nbd implements the NBD wire protocol (NetworkBlockDevice/nbd
// doc/proto.md): fixed-newstyle negotiation with TLS, structured replies and
// meta contexts, and a transmission phase that runs requests concurrently
// and replies out of order.
//
// It knows nothing about volumes: an export is a Backend, and the package
// must never import nbdserver/volume (make lint checks). This file holds the
// protocol's numbers, shared with the client in package client.
package nbd

// Port is NBD's IANA-registered TCP port.
const Port = "10809"

// Magic numbers.
const (
	MagicInit            uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	MagicOpt             uint64 = 0x49484156454f5054 // "IHAVEOPT"
	MagicOptReply        uint64 = 0x3e889045565a9
	MagicRequest         uint32 = 0x25609513
	MagicSimpleReply     uint32 = 0x67446698
	MagicStructuredReply uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle  uint16 = 1 << 0
	FlagNoZeroes       uint16 = 1 << 1
	FlagCFixedNewstyle uint32 = 1 << 0
	FlagCNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagRotational      uint16 = 1 << 4
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagSendDF          uint16 = 1 << 7
	FlagCanMultiConn    uint16 = 1 << 8
	FlagSendResize      uint16 = 1 << 9
	FlagSendCache       uint16 = 1 << 10
	FlagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
	OptExtendedHeaders uint32 = 11
)

// Option replies. Errors have bit 31 set.
const (
	RepAck              uint32 = 1
	RepServer           uint32 = 2
	RepInfo             uint32 = 3
	RepMetaContext      uint32 = 4
	RepErrUnsup         uint32 = 1<<31 + 1
	RepErrPolicy        uint32 = 1<<31 + 2
	RepErrInvalid       uint32 = 1<<31 + 3
	RepErrPlatform      uint32 = 1<<31 + 4
	RepErrTLSReqd       uint32 = 1<<31 + 5
	RepErrUnknown       uint32 = 1<<31 + 6
	RepErrShutdown      uint32 = 1<<31 + 7
	RepErrBlockSizeReqd uint32 = 1<<31 + 8
	RepErrTooBig        uint32 = 1<<31 + 9
)

// Information types of RepInfo.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Commands.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
)

// Command flags.
const (
	CmdFlagFUA      uint16 = 1 << 0
	CmdFlagNoHole   uint16 = 1 << 1
	CmdFlagDF       uint16 = 1 << 2
	CmdFlagReqOne   uint16 = 1 << 3
	CmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and types. Error types have bit 15 set.
const (
	ReplyFlagDone          uint16 = 1 << 0
	ReplyTypeNone          uint16 = 0
	ReplyTypeOffsetData    uint16 = 1
	ReplyTypeOffsetHole    uint16 = 2
	ReplyTypeBlockStatus   uint16 = 5
	ReplyTypeError         uint16 = 1<<15 + 1
	ReplyTypeErrorOffset   uint16 = 1<<15 + 2
	ReplyTypeErrorCategory uint16 = 1 << 15
)

// Error values of replies.
const (
	EPERM     uint32 = 1
	EIO       uint32 = 5
	ENOMEM    uint32 = 12
	EINVAL    uint32 = 22
	ENOSPC    uint32 = 28
	EOVERFLOW uint32 = 75
	ENOTSUP   uint32 = 95
	ESHUTDOWN uint32 = 108
)

// States of the base:allocation meta context.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// ContextBaseAllocation is the one meta context every export offers.
const ContextBaseAllocation = "base:allocation"

// Sizes.
const (
	// RequestHeaderLen, SimpleReplyLen and StructuredReplyLen are the fixed
	// header sizes of the transmission phase.
	RequestHeaderLen   = 28
	SimpleReplyLen     = 16
	StructuredReplyLen = 20
	// DefaultMaxPayload is the largest READ or WRITE this server accepts
	// unless an export says otherwise: 32 MiB, what the spec says every
	// server should take.
	DefaultMaxPayload = 32 << 20
	// MaxStringLen bounds names, descriptions, queries and messages.
	MaxStringLen = 4096
)
