package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// An encrypted repository's keys are changed through the server, which
// holds the master key: adding a password wraps it again in a new key
// object, and nothing else is written. Every change but a removal needs
// a password that opens a key already, so the admin token alone cannot
// give anyone the data.

func (s *Server) encrypted() error {
	if s.keys == nil {
		return fmt.Errorf("%w: the repository is not encrypted: it has no keys (an encrypted repository is made with serve --encrypt)", errInvalid)
	}
	return nil
}

func (s *Server) listKeys(r *http.Request) (int, any, error) {
	if err := s.encrypted(); err != nil {
		return 0, nil, err
	}
	ids, err := chunkstore.KeyIDs(r.Context(), s.repo)
	if err != nil {
		return 0, nil, err
	}
	out := []api.Key{}
	for _, id := range ids {
		k := api.Key{ID: id, Opened: id == s.keyID}
		if data, err := s.repo.Get(r.Context(), chunkstore.KeysPrefix+id); err == nil {
			if f, err := chunkstore.ParseKeyFile(data); err == nil {
				k.Created, k.Host, k.Label = f.Created, f.Host, f.Label
			} else {
				k.Label = "unreadable: " + err.Error()
			}
		}
		out = append(out, k)
	}
	return http.StatusOK, out, nil
}

// openedBy returns the ID of the key that password opens to this
// repository's master key, or an error that says none does.
func (s *Server) openedBy(ctx context.Context, password string) (string, error) {
	if password == "" {
		return "", fmt.Errorf("%w: give the password of one of the repository's keys (changing keys needs one)", errInvalid)
	}
	_, id, err := chunkstore.OpenKeys(ctx, s.repo, []byte(password), s.keyID, func(k *chunkstore.Keys) error {
		if k.Fingerprint() != s.keys.Fingerprint() {
			return errors.New("it opens to another master key than this repository's")
		}
		return nil
	})
	if errors.Is(err, chunkstore.ErrWrongPassword) {
		return "", api.Errorf(api.ErrForbidden, "%v", err)
	}
	return id, err
}

// newKey wraps the master key with password and writes it, read back.
func (s *Server) newKey(ctx context.Context, password, label string) (api.Key, error) {
	if len(password) == 0 {
		return api.Key{}, fmt.Errorf("%w: an empty new password", errInvalid)
	}
	f, err := s.keys.Wrap([]byte(password), chunkstore.DefaultKDF, label)
	if err != nil {
		return api.Key{}, err
	}
	id := chunkstore.NewKeyID()
	key := chunkstore.KeysPrefix + id
	if err := s.repo.Put(ctx, key, f.Marshal()); err != nil {
		return api.Key{}, fmt.Errorf("write key %s: %w", id, err)
	}
	data, err := s.repo.Get(ctx, key)
	if err == nil {
		var back *chunkstore.KeyFile
		if back, err = chunkstore.ParseKeyFile(data); err == nil {
			var k *chunkstore.Keys
			if k, err = back.Unwrap([]byte(password)); err == nil && k.Fingerprint() != s.keys.Fingerprint() {
				err = errors.New("it opens to another master key")
			}
		}
	}
	if err != nil {
		return api.Key{}, fmt.Errorf("key %s does not read back as written (%w): it is left in place; remove it with nbdvault key remove %s", id, err, id)
	}
	return api.Key{ID: id, Created: f.Created, Host: f.Host, Label: f.Label}, nil
}

// keyRequest decodes a key change and returns it with the ID of the key
// its current password opens, holding keyMu (the caller unlocks it).
func (s *Server) keyRequest(r *http.Request) (api.AddKey, string, error) {
	var req api.AddKey
	if err := s.encrypted(); err != nil {
		return req, "", err
	}
	if err := decode(r, &req); err != nil {
		return req, "", err
	}
	s.keyMu.Lock()
	id, err := s.openedBy(r.Context(), req.Password)
	if err != nil {
		s.keyMu.Unlock()
	}
	return req, id, err
}

func (s *Server) addKey(r *http.Request) (int, any, error) {
	req, _, err := s.keyRequest(r)
	if err != nil {
		return 0, nil, err
	}
	defer s.keyMu.Unlock()
	k, err := s.newKey(r.Context(), req.NewPassword, req.Label)
	if err != nil {
		return 0, nil, err
	}
	s.log.Info("key added", "key", k.ID, "label", k.Label)
	return http.StatusCreated, k, nil
}

// changePassword writes the new key, then deletes the one the old
// password opened: a crash between leaves both working, never none.
func (s *Server) changePassword(r *http.Request) (int, any, error) {
	req, old, err := s.keyRequest(r)
	if err != nil {
		return 0, nil, err
	}
	defer s.keyMu.Unlock()
	label := req.Label
	if label == "" {
		if data, err := s.repo.Get(r.Context(), chunkstore.KeysPrefix+old); err == nil {
			if f, err := chunkstore.ParseKeyFile(data); err == nil {
				label = f.Label
			}
		}
	}
	k, err := s.newKey(r.Context(), req.NewPassword, label)
	if err != nil {
		return 0, nil, err
	}
	if err := s.repo.Delete(r.Context(), chunkstore.KeysPrefix+old); err != nil {
		return 0, nil, fmt.Errorf("the new key %s is written, but the old one %s could not be deleted (%w): both passwords open the repository until nbdvault key remove %s", k.ID, old, err, old)
	}
	if s.keyID == old {
		s.keyID = k.ID
	}
	s.log.Info("password changed", "old_key", old, "key", k.ID)
	return http.StatusOK, k, nil
}

func (s *Server) removeKey(r *http.Request) (int, any, error) {
	if err := s.encrypted(); err != nil {
		return 0, nil, err
	}
	id := r.PathValue("id")
	s.keyMu.Lock()
	defer s.keyMu.Unlock()
	ids, err := chunkstore.KeyIDs(r.Context(), s.repo)
	if err != nil {
		return 0, nil, err
	}
	switch {
	case !slices.Contains(ids, id):
		return 0, nil, api.Errorf(api.ErrNotFound, "no key %s (nbdvault key list lists them)", id)
	case len(ids) == 1:
		return 0, nil, api.Errorf(api.ErrProtected, "key %s is the repository's last: without a key no one can read it; add another first (nbdvault key add)", id)
	}
	if err := s.repo.Delete(r.Context(), chunkstore.KeysPrefix+id); err != nil {
		return 0, nil, err
	}
	s.log.Info("key removed", "key", id)
	return http.StatusNoContent, nil, nil
}
