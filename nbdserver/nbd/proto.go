// Package nbd implements the NBD wire protocol (NetworkBlockDevice/nbd
// doc/proto.md): fixed-newstyle negotiation with TLS, structured replies and
// meta contexts, and a transmission phase that runs requests concurrently
// and replies out of order.
//
// It knows nothing about volumes: an export is a Backend, and the package
// must never import nbdserver/volume (make lint checks). This file holds the
// protocol's numbers, shared with the client in package client.
package nbd

import "fmt"

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

// ErrnoName is errno's name (EIO) and text, as strerror says it.
func ErrnoName(errno uint32) (name, text string) {
	switch errno {
	case EPERM:
		return "EPERM", "operation not permitted"
	case EIO:
		return "EIO", "input/output error"
	case ENOMEM:
		return "ENOMEM", "cannot allocate memory"
	case EINVAL:
		return "EINVAL", "invalid argument"
	case ENOSPC:
		return "ENOSPC", "no space left on device"
	case EOVERFLOW:
		return "EOVERFLOW", "value too large"
	case ENOTSUP:
		return "ENOTSUP", "operation not supported"
	case ESHUTDOWN:
		return "ESHUTDOWN", "server is shutting down"
	}
	return fmt.Sprintf("errno %d", errno), "unknown error"
}

// OptName is an option's name in the spec (NBD_OPT_GO).
func OptName(opt uint32) string {
	switch opt {
	case OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case OptAbort:
		return "NBD_OPT_ABORT"
	case OptList:
		return "NBD_OPT_LIST"
	case OptStartTLS:
		return "NBD_OPT_STARTTLS"
	case OptInfo:
		return "NBD_OPT_INFO"
	case OptGo:
		return "NBD_OPT_GO"
	case OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case OptListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option %d", opt)
}

// RepName is an option reply type's name in the spec (NBD_REP_ACK).
func RepName(rep uint32) string {
	switch rep {
	case RepAck:
		return "NBD_REP_ACK"
	case RepServer:
		return "NBD_REP_SERVER"
	case RepInfo:
		return "NBD_REP_INFO"
	case RepMetaContext:
		return "NBD_REP_META_CONTEXT"
	case RepErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case RepErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case RepErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case RepErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case RepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case RepErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case RepErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	}
	return fmt.Sprintf("reply type %#x", rep)
}

// ReplyTypeName is a structured reply chunk type's name in the spec
// (NBD_REPLY_TYPE_OFFSET_DATA).
func ReplyTypeName(typ uint16) string {
	switch typ {
	case ReplyTypeNone:
		return "NBD_REPLY_TYPE_NONE"
	case ReplyTypeOffsetData:
		return "NBD_REPLY_TYPE_OFFSET_DATA"
	case ReplyTypeOffsetHole:
		return "NBD_REPLY_TYPE_OFFSET_HOLE"
	case ReplyTypeBlockStatus:
		return "NBD_REPLY_TYPE_BLOCK_STATUS"
	case ReplyTypeError:
		return "NBD_REPLY_TYPE_ERROR"
	case ReplyTypeErrorOffset:
		return "NBD_REPLY_TYPE_ERROR_OFFSET"
	}
	return fmt.Sprintf("type %d", typ)
}
