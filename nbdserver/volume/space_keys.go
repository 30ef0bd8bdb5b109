package volume

// ManifestKey is the repository key of volume vol's manifest id of kind
// kind: how Space.Manifests names it.
func ManifestKey(vol string, kind Kind, id string) string { return manifestKey(vol, kind, id) }
