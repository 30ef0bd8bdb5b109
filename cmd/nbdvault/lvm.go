package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// A volume that is the NBD leg of an LVM raid1 holds an LVM physical
// volume: a label, a metadata area with the volume group's text metadata,
// and the extents of the raid1's second image (rimage) at the PV's data
// start. mount reads the metadata itself (the host may have no LVM, and
// activating a copy of a live VG would clash with it) and mounts the
// image's extents.

// lvmLeg is where a raid1 image lies on the PV.
type lvmLeg struct {
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

// findLVMLeg looks for an LVM2 physical volume in f (size bytes) holding
// one image of a raid1 logical volume. It returns nil without a PV label.
// Whatever the label and metadata say, it reads only within the first
// size bytes and allocates at most maxLVMText for the text.
func findLVMLeg(f io.ReaderAt, size int64) (*lvmLeg, error) {
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
// whose extents are on the PV with this (undashed) uuid.
func legFromMetadata(text, uuid string, size int64) (*lvmLeg, error) {
	root, err := parseLVMConfig(text)
	if err != nil {
		return nil, fmt.Errorf("the LVM metadata: %w", err)
	}
	var vgName string
	var vg lvmSection
	for k, v := range root {
		if s, ok := v.(lvmSection); ok {
			vgName, vg = k, s
		}
	}
	if vg == nil {
		return nil, errors.New("the LVM metadata names no volume group")
	}
	extent := vg.int("extent_size") * 512
	pvName, peStart := "", int64(0)
	for name, v := range vg.section("physical_volumes") {
		pv, _ := v.(lvmSection)
		if strings.ReplaceAll(pv.str("id"), "-", "") == uuid {
			pvName, peStart = name, pv.int("pe_start")*512
		}
	}
	if pvName == "" || extent <= 0 {
		return nil, fmt.Errorf("volume group %s does not list this physical volume", vgName)
	}
	lvs := vg.section("logical_volumes")
	for lvName, v := range lvs {
		seg := v.(lvmSection).section("segment1")
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
			first, _ := strconv.ParseInt(stripes[1], 10, 64)
			leg := &lvmLeg{LV: vgName + "/" + lvName, Image: img,
				Offset: peStart + first*extent, Size: iseg.int("extent_count") * extent}
			if leg.Offset+leg.Size > size {
				return nil, fmt.Errorf("%s's image %s does not fit the volume: the metadata is damaged", leg.LV, img)
			}
			return leg, nil
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

// parseLVMConfig parses LVM's text metadata: name = value, name { ... },
// values "string", number or [ list ], and # comments.
func parseLVMConfig(text string) (lvmSection, error) {
	toks := lvmTokens(text)
	pos := 0
	var parse func() (lvmSection, error)
	parse = func() (lvmSection, error) {
		sec := lvmSection{}
		for pos < len(toks) {
			name := toks[pos]
			if name == "}" {
				pos++
				return sec, nil
			}
			if pos+1 >= len(toks) {
				return nil, fmt.Errorf("%q ends the metadata", name)
			}
			switch toks[pos+1] {
			case "{":
				pos += 2
				sub, err := parse()
				if err != nil {
					return nil, err
				}
				sec[name] = sub
			case "=":
				pos += 2
				if pos >= len(toks) {
					return nil, fmt.Errorf("%s = ends the metadata", name)
				}
				if toks[pos] != "[" {
					sec[name] = unquote(toks[pos])
					pos++
					continue
				}
				var list []string
				for pos++; pos < len(toks) && toks[pos] != "]"; pos++ {
					if toks[pos] != "," {
						list = append(list, unquote(toks[pos]))
					}
				}
				pos++
				sec[name] = list
			default:
				return nil, fmt.Errorf("unexpected %q after %q", toks[pos+1], name)
			}
		}
		return sec, nil
	}
	return parse()
}

func unquote(s string) string { return strings.Trim(s, `"`) }

// lvmTokens splits LVM metadata into names, values, strings and the
// punctuation { } [ ] = ,.
func lvmTokens(text string) []string {
	var toks []string
	for i := 0; i < len(text); {
		c := text[i]
		switch {
		case c == '#':
			for i < len(text) && text[i] != '\n' {
				i++
			}
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case strings.IndexByte("{}[]=,", c) >= 0:
			toks = append(toks, string(c))
			i++
		case c == '"':
			j := i + 1
			for j < len(text) && text[j] != '"' {
				if text[j] == '\\' {
					j++
				}
				j++
			}
			toks = append(toks, text[i:min(j+1, len(text))])
			i = j + 1
		default:
			j := i
			for j < len(text) && strings.IndexByte(" \t\r\n{}[]=,#\"", text[j]) < 0 {
				j++
			}
			toks = append(toks, text[i:j])
			i = j
		}
	}
	return toks
}
