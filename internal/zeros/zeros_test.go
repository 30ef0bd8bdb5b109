package zeros

import "testing"

func TestIs(t *testing.T) {
	if !Is(nil) {
		t.Fatal("nothing is all zeros")
	}
	for _, n := range []int{1, 7, 64 << 10, 1 << 20, 1<<20 + 1, 3<<20 + 5} {
		p := make([]byte, n)
		if !Is(p) {
			t.Fatalf("%d zeros", n)
		}
		for _, i := range []int{0, n / 2, n - 1} {
			p[i] = 1
			if Is(p) {
				t.Fatalf("n=%d, byte %d set", n, i)
			}
			p[i] = 0
		}
	}
}
