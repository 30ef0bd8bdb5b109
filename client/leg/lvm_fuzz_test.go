package leg

import (
	"io"
	"strings"
	"testing"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

// boundedDevice is a device that fails the test on a read the
// parsers should have refused: past maxLVMText bytes, or of metadata
// (beyond the label's first four sectors) past the device's end.
type boundedDevice struct {
	testdev.Placed
	t *testing.T
}

func (d boundedDevice) ReadAt(p []byte, off int64) (int, error) {
	if len(p) > maxLVMText || off >= 2048 && int64(len(p)) > d.Size-off {
		d.t.Fatalf("a read of %d bytes at %d on a %d-byte device", len(p), off, d.Size)
	}
	return d.Placed.ReadAt(p, off)
}

// checkLeg fails the test unless leg lies within a size-byte device.
func checkLeg(t *testing.T, leg *LVMLeg, size int64) {
	if leg != nil && (leg.Offset < 0 || leg.Size <= 0 || leg.Offset > size || leg.Size > size-leg.Offset) {
		t.Fatalf("%s's image %s at [%d, +%d) outside the %d-byte device", leg.LV, leg.Image, leg.Offset, leg.Size, size)
	}
}

// FuzzLVMLabel fuzzes the label sector (sector 1) and the start of the
// metadata area (at 4096, its header then the ring).
func FuzzLVMLabel(f *testing.F) {
	const size = 64 << 20
	add := func(img []byte, size int64) { f.Add(img[512:1024], img[4096:], size) }
	add(lvmPV(pv1UUID, lvmText, 2048, 512), size)
	add(lvmPV(pv1UUID, lvmText, 2048, 2048-100), size) // wrapped round the ring
	add(lvmPV(pv1UUID, lvmText, 2048, 512), 16<<20)    // the image past the end
	add(lvmPV(pv1UUID, lvmText, 2048, 512), 5000)      // the area past the end
	add(lvmPV("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", lvmText, 2048, 512), size)
	for _, damage := range []func(img []byte){
		func(img []byte) { img[512+20] = 0xa0; img[512+21] = 0x0f },         // PV header at 4000
		func(img []byte) { img[512+32+72+7] = 0x80 },                        // metadata area at 2^63
		func(img []byte) { img[4096+48+2] = 0x10 },                          // text of 1 MiB
		func(img []byte) { img[4096+40] = 100; img[4096+41] = 0 },           // text in the header
		func(img []byte) { copy(img[4096+512:], "vg { a { b { c = [ 1, ") }, // metadata left open
	} {
		img := lvmPV(pv1UUID, lvmText, 2048, 512)
		damage(img)
		add(img, size)
	}
	f.Fuzz(func(t *testing.T, label, area []byte, size int64) {
		if size < 0 {
			return
		}
		dev := testdev.Placed{Size: size, Parts: map[int64][]byte{512: label, 4096: area}}
		leg, err := FindLVM(boundedDevice{dev, t}, size)
		if err == nil {
			checkLeg(t, leg, size)
		}
	})
}

func FuzzLVMMetadata(f *testing.F) {
	f.Add(lvmText)
	f.Add(strings.Replace(lvmText, `"pv1", 1`, `"pv1", 4503599627370496`, 1))
	f.Add(strings.Replace(lvmText, "extent_size = 8192", "extent_size = -1", 1))
	f.Add(strings.Replace(lvmText, "data_rimage_1 {", "data_rimage_1 = 1\ny {", 1))
	f.Add(strings.Replace(lvmText, "raids = [", "raids = [ [", 1))
	f.Add(`a = "x \"q\" \\ y" # c` + "\n" + `b = [1, "two", 3]`)
	f.Add(strings.Repeat("s {", 40))
	f.Add(`vg { = }`)
	f.Add(`a = "open`)
	f.Fuzz(func(t *testing.T, text string) {
		const size = 64 << 20
		leg, err := legFromMetadata(text, pv1UUID, size)
		if err == nil {
			checkLeg(t, leg, size)
		}
	})
}

var _ io.ReaderAt = boundedDevice{}
