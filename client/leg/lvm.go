package leg

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// A volume that is the NBD leg of an LVM raid1 holds an LVM physical
// volume: a label, a metadata area with the volume group's text metadata,
// and the extents of the raid1's second image (rimage) at the PV's data
// start. mount reads the metadata itself (the host may have no LVM, and
// activating a copy of a live VG would clash with it) and mounts the
// image's extents.

// LVMLeg is where a raid1 image lies on the PV.
type LVMLeg struct {
	LV           string // the raid1 logical volume, VG/LV
	Image        string // its image on this PV, e.g. data_rimage_1
	Offset, Size int64  // bytes
}

// The on-disk layout (LVM2's format_text/layout.h). A label sector holds
// label_header (id "LABELONE", sector_xl, crc, offset_xl, type "LVM2 001")
// and, at offset_xl, pv_header (uuid, device_size_xl, then the data areas
// and the metadata areas, each list of {offset, size} ended by a zero
// entry). A metadata area starts with a 512-byte mda_header (checksum,
// magic, version, start, size, then raw_locns, the first the current
// metadata: offset into the area, size, checksum, flags); the rest of
// the area is a ring holding the text.
const (
	lvmLabelHeaderSize = 32
	lvmPVHeaderFixed   = 40 // uuid and device size, before the lists
	lvmMDAHeaderSize   = 512
	// maxLVMText bounds the metadata text read: LVM's metadata area is
	// about 1 MiB by default, and the text must fit in it twice over.
	maxLVMText = 16 << 20
)

// FindLVM looks for an LVM2 physical volume in f (size bytes) holding
// one image of a raid1 logical volume. It returns nil without a PV label.
// Whatever the label and metadata say, it reads only within the first
// size bytes and allocates at most maxLVMText for the text.
func FindLVM(f io.ReaderAt, size int64) (*LVMLeg, error) {
	var sector [512]byte
	label := int64(-1)
	for s := int64(0); s < 4; s++ { // the label is in one of the first four sectors
		if _, err := f.ReadAt(sector[:], s*512); err != nil {
			return nil, nil
		}
		if string(sector[:8]) == "LABELONE" && string(sector[24:32]) == "LVM2 001" {
			label = s
			break
		}
	}
	if label < 0 {
		return nil, nil
	}
	le := binary.LittleEndian
	at := le.Uint32(sector[20:])
	if at < lvmLabelHeaderSize || at > uint32(len(sector))-lvmPVHeaderFixed {
		return nil, fmt.Errorf("LVM label in sector %d: its PV header at %d does not fit between the label header and the sector's end: the label is damaged", label, at)
	}
	pvh := sector[at:]
	uuid := string(pvh[:32])
	// Data areas, then metadata areas, each list ended by a zero entry.
	areas := pvh[lvmPVHeaderFixed:]
	next := func() (off, n uint64, ok bool) {
		if len(areas) < 16 {
			return 0, 0, false
		}
		off, n = le.Uint64(areas), le.Uint64(areas[8:])
		areas = areas[16:]
		return off, n, off != 0 || n != 0
	}
	for _, _, ok := next(); ok; _, _, ok = next() {
	}
	mdaOff, _, ok := next()
	if !ok {
		return nil, errors.New("an LVM physical volume without a metadata area")
	}
	text, err := readLVMMetadata(f, mdaOff, size)
	if err != nil {
		return nil, err
	}
	return legFromMetadata(text, uuid, size)
}

// readLVMMetadata reads the current metadata text of the metadata area
// at off in f (size bytes). Every offset and length the area's header
// gives is checked against the area and the volume before it is used.
func readLVMMetadata(f io.ReaderAt, off uint64, size int64) (string, error) {
	where := fmt.Sprintf("LVM metadata area at offset %d", off)
	if size < lvmMDAHeaderSize || off > uint64(size-lvmMDAHeaderSize) {
		return "", fmt.Errorf("%s: its header lies past the volume's end (%d bytes): the PV header is damaged", where, size)
	}
	var hdr [lvmMDAHeaderSize]byte
	if _, err := f.ReadAt(hdr[:], int64(off)); err != nil {
		return "", fmt.Errorf("%s: reading its header: %w", where, err)
	}
	if !bytes.Equal(hdr[4:20], []byte(" LVM2 x[5A%r0N*>")) {
		return "", fmt.Errorf("%s: no metadata area header there", where)
	}
	le := binary.LittleEndian
	start, areaSize := le.Uint64(hdr[24:]), le.Uint64(hdr[32:])
	textOff, textSize := le.Uint64(hdr[40:]), le.Uint64(hdr[48:])
	switch {
	case start != off:
		return "", fmt.Errorf("%s: its header says it starts at %d: it is damaged", where, start)
	case areaSize <= lvmMDAHeaderSize:
		return "", fmt.Errorf("%s: an area of %d bytes has no room for metadata: it is damaged", where, areaSize)
	case areaSize > uint64(size)-off:
		return "", fmt.Errorf("%s: %d bytes run past the volume's end (%d bytes): it is damaged", where, areaSize, size)
	case textSize == 0:
		return "", fmt.Errorf("%s: no current metadata", where)
	case textOff < lvmMDAHeaderSize || textOff >= areaSize:
		return "", fmt.Errorf("%s: text at %d lies outside the area's ring [%d, %d): it is damaged", where, textOff, lvmMDAHeaderSize, areaSize)
	case textSize > areaSize-lvmMDAHeaderSize:
		return "", fmt.Errorf("%s: text of %d bytes runs past the area's end (a ring of %d bytes): it is damaged", where, textSize, areaSize-lvmMDAHeaderSize)
	case textSize > maxLVMText:
		return "", fmt.Errorf("%s: text of %d bytes, more than the %d MiB nbdvault reads", where, textSize, maxLVMText>>20)
	}
	text := make([]byte, textSize)
	first := min(textSize, areaSize-textOff) // the text wraps round the ring
	if _, err := f.ReadAt(text[:first], int64(start+textOff)); err != nil {
		return "", fmt.Errorf("%s: reading its text: %w", where, err)
	}
	if first < textSize {
		if _, err := f.ReadAt(text[first:], int64(start+lvmMDAHeaderSize)); err != nil {
			return "", fmt.Errorf("%s: reading its text: %w", where, err)
		}
	}
	return string(bytes.TrimRight(text, "\x00")), nil
}

// legFromMetadata finds, in a volume group's metadata, the raid1 image
// whose extents are on the PV with this (undashed) uuid, within the
// first size bytes of the PV.
func legFromMetadata(text, uuid string, size int64) (*LVMLeg, error) {
	root, err := parseLVMConfig(text)
	if err != nil {
		return nil, fmt.Errorf("the LVM metadata: %w", err)
	}
	var vgs []string
	for k, v := range root {
		if _, ok := v.(lvmSection); ok {
			vgs = append(vgs, k)
		}
	}
	switch len(vgs) {
	case 0:
		return nil, errors.New("the LVM metadata names no volume group")
	case 1:
	default:
		slices.Sort(vgs)
		return nil, fmt.Errorf("the LVM metadata names %d volume groups (%s) where LVM writes one: it is damaged", len(vgs), strings.Join(vgs, ", "))
	}
	vgName := vgs[0]
	vg := root.section(vgName)
	sectors := size / 512
	extentSectors := vg.int("extent_size")
	if extentSectors <= 0 || extentSectors > sectors {
		return nil, fmt.Errorf("volume group %s: an extent size of %q sectors on a volume of %d: the metadata is damaged", vgName, vg.str("extent_size"), sectors)
	}
	extent := extentSectors * 512
	pvName, peStart := "", int64(0)
	for name, v := range vg.section("physical_volumes") {
		pv, _ := v.(lvmSection)
		if strings.ReplaceAll(pv.str("id"), "-", "") != uuid {
			continue
		}
		start := pv.int("pe_start")
		if start < 0 || start > sectors {
			return nil, fmt.Errorf("volume group %s: physical volume %s has pe_start %q, not within its %d sectors: the metadata is damaged", vgName, name, pv.str("pe_start"), sectors)
		}
		pvName, peStart = name, start*512
	}
	if pvName == "" {
		return nil, fmt.Errorf("volume group %s does not list this physical volume", vgName)
	}
	lvs := vg.section("logical_volumes")
	for lvName, v := range lvs {
		lv, _ := v.(lvmSection)
		seg := lv.section("segment1")
		if seg.str("type") != "raid1" {
			continue
		}
		raids := seg.list("raids") // rmeta_0, rimage_0, rmeta_1, rimage_1, ...
		for i := 1; i < len(raids); i += 2 {
			img := raids[i]
			image, _ := lvs[img].(lvmSection)
			iseg := image.section("segment1")
			stripes := iseg.list("stripes")
			if image.int("segment_count") != 1 || len(stripes) != 2 || stripes[0] != pvName {
				continue
			}
			what := vgName + "/" + lvName + "'s image " + img
			first, err := strconv.ParseInt(stripes[1], 10, 64)
			if err != nil || first < 0 {
				return nil, fmt.Errorf("%s: a first extent of %q: the metadata is damaged", what, stripes[1])
			}
			count := iseg.int("extent_count")
			if count <= 0 {
				return nil, fmt.Errorf("%s: %q extents: the metadata is damaged", what, iseg.str("extent_count"))
			}
			// peStart + (first+count)*extent <= size, without overflow.
			room := (size - peStart) / extent
			if first > room || count > room-first {
				return nil, fmt.Errorf("%s (extents %d+%d of %d bytes from %d) does not fit the %d-byte volume: the metadata is damaged", what, first, count, extent, peStart, size)
			}
			return &LVMLeg{LV: vgName + "/" + lvName, Image: img, Offset: peStart + first*extent, Size: count * extent}, nil
		}
	}
	return nil, fmt.Errorf("an LVM physical volume of volume group %s that holds no whole image of a raid1 logical volume", vgName)
}

// lvmSection is a { ... } of LVM's metadata: values are strings (numbers
// as written), []string lists, or sections.
type lvmSection map[string]any

func (s lvmSection) section(k string) lvmSection { v, _ := s[k].(lvmSection); return v }
func (s lvmSection) str(k string) string         { v, _ := s[k].(string); return v }
func (s lvmSection) list(k string) []string      { v, _ := s[k].([]string); return v }
func (s lvmSection) int(k string) int64 {
	n, _ := strconv.ParseInt(s.str(k), 10, 64)
	return n
}

// maxLVMDepth bounds the nesting of sections; LVM's metadata nests four
// deep (vg, logical_volumes, an LV, a segment).
const maxLVMDepth = 16

// parseLVMConfig parses LVM's text metadata: name = value, name { ... },
// values "string", number or [ list ], and # comments. Anything else,
// including a section or list left open, is an error.
func parseLVMConfig(text string) (lvmSection, error) {
	lx := &lvmLexer{text: text}
	var parse func(depth int) (lvmSection, error)
	parse = func(depth int) (lvmSection, error) {
		if depth > maxLVMDepth {
			return nil, fmt.Errorf("sections nested more than %d deep", maxLVMDepth)
		}
		sec := lvmSection{}
		for {
			name, err := lx.next()
			switch {
			case err != nil:
				return nil, err
			case name == "" && depth == 0:
				return sec, nil
			case name == "":
				return nil, errors.New("a section is not closed")
			case name == "}" && depth > 0:
				return sec, nil
			case isLVMPunct(name):
				return nil, fmt.Errorf("unexpected %q", name)
			}
			op, err := lx.next()
			switch {
			case err != nil:
				return nil, err
			case op == "":
				return nil, fmt.Errorf("%q ends the metadata", name)
			case op == "{":
				if sec[name], err = parse(depth + 1); err != nil {
					return nil, err
				}
				continue
			case op != "=":
				return nil, fmt.Errorf("unexpected %q after %q", op, name)
			}
			v, err := lx.next()
			switch {
			case err != nil:
				return nil, err
			case v == "":
				return nil, fmt.Errorf("%s = ends the metadata", name)
			case v == "[":
				if sec[name], err = lx.list(name); err != nil {
					return nil, err
				}
			case isLVMPunct(v):
				return nil, fmt.Errorf("unexpected %q after %s =", v, name)
			default:
				sec[name] = lvmValue(v)
			}
		}
	}
	return parse(0)
}

// lvmLexer splits LVM metadata into names, values, strings (with their
// quotes) and the punctuation { } [ ] = ,.
type lvmLexer struct {
	text string
	i    int
}

func isLVMPunct(tok string) bool { return len(tok) == 1 && strings.Contains("{}[]=,", tok) }

// next returns the next token, or "" at the end.
func (lx *lvmLexer) next() (string, error) {
	text := lx.text
	for lx.i < len(text) {
		i, c := lx.i, text[lx.i]
		switch {
		case c == '#':
			for lx.i < len(text) && text[lx.i] != '\n' {
				lx.i++
			}
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			lx.i++
		case strings.IndexByte("{}[]=,", c) >= 0:
			lx.i++
			return text[i : i+1], nil
		case c == '"':
			j := i + 1
			for j < len(text) && text[j] != '"' {
				if text[j] == '\\' {
					j++
				}
				j++
			}
			if j >= len(text) {
				return "", fmt.Errorf("a string at byte %d is not closed", i)
			}
			lx.i = j + 1
			return text[i:lx.i], nil
		default:
			j := i
			for j < len(text) && strings.IndexByte(" \t\r\n{}[]=,#\"", text[j]) < 0 {
				j++
			}
			lx.i = j
			return text[i:j], nil
		}
	}
	return "", nil
}

// list reads the rest of a [ list ] of name.
func (lx *lvmLexer) list(name string) ([]string, error) {
	var list []string
	for {
		tok, err := lx.next()
		switch {
		case err != nil:
			return nil, err
		case tok == "":
			return nil, fmt.Errorf("the list %s is not closed", name)
		case tok == "]":
			return list, nil
		case tok == ",":
		case isLVMPunct(tok):
			return nil, fmt.Errorf("unexpected %q in the list %s", tok, name)
		default:
			list = append(list, lvmValue(tok))
		}
	}
}

// lvmValue is a value token as a string: a quoted string without its
// quotes and backslash escapes, anything else as written.
func lvmValue(tok string) string {
	if len(tok) < 2 || tok[0] != '"' {
		return tok
	}
	s := tok[1 : len(tok)-1]
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
